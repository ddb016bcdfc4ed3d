"""DoRA adapters both ways between lora-vit and PEFT, checked against PEFT itself."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_vit import LoRAError, LoRALinear, inject_lora
from lora_vit.peft_compat import load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(1)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def peft_dora(base, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model.eval()


def test_peft_dora_folder_imports_with_peft_outputs(base, x, tmp_path):
    reference = peft_dora(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                          rank_pattern={"fc1": 2}, lora_dropout=0.1)
    reference.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.vit.layers.0.attention.q_proj.lora_magnitude_vector" in keys
    model = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 6 and all(m.use_dora for m in layers)
    expected = logits(reference, x)
    assert not torch.allclose(expected, logits(base, x), atol=1e-3)
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


def test_lora_vit_dora_export_loads_in_peft_with_the_same_outputs(base, x, tmp_path):
    model = inject_lora(copy.deepcopy(base), ["q", "k", "v"], r={"q": 4, "k": 2, "v": 4}, alpha=8, use_dora=True)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.2)
                layer.lora_magnitude.mul_(1.25)
    model.eval()
    folder = save_peft_adapter(model, tmp_path / "ours")
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=1e-5, atol=1e-5)
    back = load_peft_adapter(copy.deepcopy(base), folder).eval()
    assert torch.equal(logits(back, x), logits(model, x))


def test_dora_gradients_match_peft_without_dropout(base, x):
    """Same factors, same loss: the same gradients for A, B and the magnitude as PEFT (norm detached in both)."""
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                        use_dora=True, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    folder_state = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    ours = inject_lora(copy.deepcopy(base), ["q"], r=2, alpha=4, dropout=0.0, use_dora=True)
    with torch.no_grad():
        for i in range(2):
            layer = ours.vit.layers[i].attention.q_proj
            prefix = f"base_model.model.vit.layers.{i}.attention.q_proj."
            layer.lora_A.copy_(folder_state[prefix + "lora_A.default.weight"])
            layer.lora_B.copy_(folder_state[prefix + "lora_B.default.weight"])
            layer.lora_magnitude.copy_(folder_state[prefix + "lora_magnitude_vector.default.weight"])
    for model in (reference, ours):
        model.train()
        model(pixel_values=x).logits.square().sum().backward()
    for i in range(2):
        layer = ours.vit.layers[i].attention.q_proj
        prefix = f"base_model.model.vit.layers.{i}.attention.q_proj."
        grads = {n: p.grad for n, p in reference.named_parameters() if n.startswith(prefix) and p.grad is not None}
        torch.testing.assert_close(layer.lora_magnitude.grad, grads[prefix + "lora_magnitude_vector.default.weight"],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_A.grad, grads[prefix + "lora_A.default.weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, grads[prefix + "lora_B.default.weight"], rtol=1e-4, atol=1e-5)


def test_magnitude_problems_are_named(base, tmp_path):
    peft_dora(base, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "src" / "adapter_model.safetensors")
    key = "base_model.model.vit.layers.0.attention.q_proj.lora_magnitude_vector"

    def folder(name, cfg, ts):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(ts, path / "adapter_model.safetensors")
        return path

    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(LoRAError, match="needs both lora_A and lora_B and lora_magnitude_vector"):
        load_peft_adapter(copy.deepcopy(base), folder("missing", config, missing))
    with pytest.raises(LoRAError, match=r"lora_magnitude' has shape \(5,\)"):
        load_peft_adapter(copy.deepcopy(base), folder("shape", config, {**tensors, key: torch.ones(5)}))
    with pytest.raises(LoRAError, match="does not set use_dora"):
        load_peft_adapter(copy.deepcopy(base), folder("flag", {**config, "use_dora": False}, tensors))


def test_export_refuses_mixed_dora_and_lora(tmp_path):
    model = inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), ["0"], r=2, use_dora=True)
    inject_lora(model, ["1"], r=2)
    with pytest.raises(LoRAError, match="use_dora"):
        save_peft_adapter(model, tmp_path / "x")
