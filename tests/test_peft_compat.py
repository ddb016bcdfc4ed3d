"""PEFT adapter folders both ways, checked against PEFT itself (tiny HF ViT, nothing downloaded)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_vit import LoRAError, LoRALinear, inject_lora, lora_summary
from lora_vit.peft_compat import load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from models import TimmStyleViT  # noqa: E402


def tiny_classifier():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(1)
    return tiny_classifier()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def randomise_lora_vit(model, head=False):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.2)
        if head:
            model.classifier.weight.normal_(0, 0.5)


def randomise_peft(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)


def peft_model(base, **config):
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    randomise_peft(model)
    return model.eval()


def test_export_loads_in_peft_with_the_same_outputs(base, x, tmp_path):
    model = inject_lora(copy.deepcopy(base), ["q", "k", "v", "fc1"], r={"q": 4, "k": 2, "v": 4, "fc1": 8},
                        alpha={"q": 8, "k": 8, "v": 3, "fc1": 8}, trainable=["classifier"])
    randomise_lora_vit(model, head=True)
    model.eval()
    folder = save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    assert set(load_file(folder / "adapter_model.safetensors")) >= {
        "base_model.model.vit.layers.0.attention.k_proj.lora_A.weight", "base_model.model.classifier.weight"}

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(base, x), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(logits(loaded, x), expected, rtol=1e-5, atol=1e-6)


def test_export_rslora_loads_in_peft_with_the_same_outputs(base, x, tmp_path):
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=4, alpha=6, use_rslora=True).eval()
    randomise_lora_vit(model)
    folder = save_peft_adapter(model, tmp_path / "rs")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert loaded.peft_config["default"].use_rslora
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_folder_imports_with_the_same_outputs(base, x, tmp_path, rslora):
    reference = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2"],
                           rank_pattern={"layers.1.attention.q_proj": 2}, alpha_pattern={"v_proj": 3},
                           modules_to_save=["classifier"], use_rslora=rslora, lora_dropout=0.1)
    reference.save_pretrained(tmp_path / "peft")
    model = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()

    q1 = model.vit.layers[1].attention.q_proj
    assert (q1.slices[0].r, q1.slices[0].alpha, q1.use_rslora) == (2, 8.0, rslora)
    v0 = model.vit.layers[0].attention.v_proj
    assert (v0.slices[0].r, v0.slices[0].alpha, v0.dropout) == (4, 3.0, 0.1)
    summary = lora_summary(model)
    assert len(summary.adapted) == 6 and summary.trainable_modules == ("classifier",)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=1e-5, atol=1e-6)


def test_round_trips_are_exact(base, x, tmp_path):
    """lora-vit -> PEFT folder -> lora-vit is bit-identical; PEFT -> lora-vit -> PEFT matches PEFT."""
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=4, alpha=8, trainable=["classifier"]).eval()
    randomise_lora_vit(model, head=True)
    back = load_peft_adapter(copy.deepcopy(base), save_peft_adapter(model, tmp_path / "a")).eval()
    assert torch.equal(logits(back, x), logits(model, x))

    reference = peft_model(base, r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"])
    reference.save_pretrained(tmp_path / "p")
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / "p")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), save_peft_adapter(ours, tmp_path / "b")).eval()
    assert torch.equal(logits(again, x), logits(reference, x))


def test_loading_into_matching_adapters_works_and_a_different_layout_is_refused(base, x, tmp_path):
    reference = peft_model(base, r=4, lora_alpha=8)
    reference.save_pretrained(tmp_path / "p")
    same = inject_lora(copy.deepcopy(base), ["q", "v"], r=4, alpha=8).eval()
    load_peft_adapter(same, tmp_path / "p", adapter="default")  # named: a PEFT load swaps only when told
    torch.testing.assert_close(logits(same, x), logits(reference, x), rtol=1e-5, atol=1e-6)
    other = inject_lora(copy.deepcopy(base), ["q", "v"], r=2, alpha=8)
    with pytest.raises(LoRAError, match="another layout"):
        load_peft_adapter(other, tmp_path / "p", adapter="default")


def write_folder(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def plain_folder(tmp_path, base, **config):
    reference = peft_model(base, **config)
    reference.save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    return cfg, load_file(tmp_path / "src" / "adapter_model.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    ({"use_dora": True}, "needs both lora_A and lora_B and lora_magnitude_vector"),
    ({"use_dora": "yes"}, "use_dora should be true or false"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "'IA3' adapter"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"rank_pattern": {"q_proj": 2}}, "rank 4 in its tensors but r=2"),
    ({"r": "4"}, "r should be a number"),
])
def test_unrepresentable_configs_are_refused_and_leave_the_model_unchanged(base, tmp_path, change, message):
    config, tensors = plain_folder(tmp_path, base, r=4, lora_alpha=8)
    folder = write_folder(tmp_path / "bad", {**config, **change}, tensors)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=message):
        load_peft_adapter(model, folder)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.pop("base_model.model.vit.layers.0.attention.q_proj.lora_B.weight"), "needs both lora_A and lora_B"),
    (lambda t: t.update({"base_model.model.vit.layers.0.attention.q_proj.lora_magnitude_vector": torch.ones(32)}),
     "DoRA magnitude, but the config does not set use_dora"),
    (lambda t: t.update({"base_model.model.vit.layernorm.weight": torch.ones(32)}), "no modules_to_save module"),
    (lambda t: t.update({"vit.layers.0.attention.q_proj.lora_A.weight": torch.ones(4, 32)}), "PEFT's prefix"),
    (lambda t: t.update({"base_model.model.vit.nope.lora_A.weight": torch.ones(4, 32),
                         "base_model.model.vit.nope.lora_B.weight": torch.ones(32, 4)}), "does not have"),
    (lambda t: t.update({"base_model.model.vit.layers.0.attention.q_proj.lora_B.weight": torch.ones(16, 4)}),
     "has shape"),
    (lambda t: t.update({"base_model.model.vit.layers.0.attention.q_proj.lora_B.weight":
                         torch.full((32, 4), float("inf"))}),
     "NaN or Inf"),
])
def test_bad_tensors_are_named_and_leave_the_model_unchanged(base, tmp_path, edit, message):
    config, tensors = plain_folder(tmp_path, base, r=4, lora_alpha=8)
    edit(tensors)
    folder = write_folder(tmp_path / "bad", config, tensors)
    model = copy.deepcopy(base)
    with pytest.raises(LoRAError, match=message):
        load_peft_adapter(model, folder)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_partial_modules_to_save_is_refused(base, tmp_path):
    config, tensors = plain_folder(tmp_path, base, r=4, lora_alpha=8, modules_to_save=["classifier"])
    del tensors["base_model.model.classifier.bias"]
    with pytest.raises(LoRAError, match=r"missing tensors.*classifier\.bias"):
        load_peft_adapter(copy.deepcopy(base), write_folder(tmp_path / "bad", config, tensors))


def test_missing_files_and_pickles(base, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_peft_adapter(copy.deepcopy(base), tmp_path)
    config, _ = plain_folder(tmp_path, base, r=4, lora_alpha=8)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        load_peft_adapter(copy.deepcopy(base), folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(LoRAError, match="not a readable safetensors"):
        load_peft_adapter(copy.deepcopy(base), folder)


def test_export_refuses_fused_slices_mixed_rslora_and_unadapted_models(tmp_path):
    timm_like = inject_lora(TimmStyleViT(), ["q", "v"], r=2)
    with pytest.raises(LoRAError, match="fused q/k/v slices"):
        save_peft_adapter(timm_like, tmp_path / "a")
    mixed = inject_lora(TimmStyleViT(), ["o"], r=2)
    inject_lora(mixed, ["fc1"], r=2, use_rslora=True)
    with pytest.raises(LoRAError, match="use_rslora"):
        save_peft_adapter(mixed, tmp_path / "b")
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_peft_adapter(TimmStyleViT(), tmp_path / "c")
    assert not (tmp_path / "a").exists()


def test_whole_fused_layer_exports_and_suffix_clashes_stay_exact(tmp_path):
    """A literal fused layer is one plain adapter; names that end other names get exact patterns."""
    base = TimmStyleViT().eval()
    model = inject_lora(copy.deepcopy(base), ["blocks.0.attn.qkv", "blocks.1.attn.proj"], r={"blocks.0.attn.qkv": 4,
                        "blocks.1.attn.proj": 2}, alpha=8).eval()
    randomise_lora_vit(model)
    folder = save_peft_adapter(model, tmp_path / "qkv")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)

    nested = torch.nn.Sequential()
    nested.add_module("a", torch.nn.Linear(4, 4))
    nested.add_module("b", torch.nn.Sequential())
    nested.b.add_module("a", torch.nn.Linear(4, 4))
    adapted = inject_lora(copy.deepcopy(nested), ["[a]"], r=2, alpha=4).eval()  # glob: only the top-level "a"
    randomise_lora_vit(adapted)
    folder = save_peft_adapter(adapted, tmp_path / "n")
    # A plain list ["a"] would make PEFT adapt the unadapted "b.a" too; a full-match regex does not.
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == "a"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(nested), folder).eval()
    assert "lora_A" not in dict(loaded.base_model.model.b.a.named_children())
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), adapted(x), rtol=1e-5, atol=1e-6)
