"""Real HF transformers models (built from a tiny config, nothing downloaded)."""

import copy

import pytest
import torch

from lora_vit import LoRALinear, inject_lora, load_lora, lora_summary, merge_lora, save_lora

transformers = pytest.importorskip("transformers")


def tiny(config_cls, **extra):
    return config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8, **extra)


def randomise(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.1)


def test_classifier_adapter_file_rebuilds_on_a_fresh_model_and_merge_loads_into_plain_vit(tmp_path):
    config = tiny(transformers.ViTConfig, num_labels=2)
    base = transformers.ViTForImageClassification(config).eval()
    model = inject_lora(copy.deepcopy(base), ["query", "key", "value"], r=4, alpha=32, trainable=["classifier"])
    summary = lora_summary(model)
    assert len(summary.adapted) == 6 and summary.trainable_modules == ("classifier",)
    randomise(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).logits
    path = save_lora(model, tmp_path / "vit.safetensors", metadata={"num_labels": 2})
    fresh = load_lora(copy.deepcopy(base), path).eval()
    assert torch.equal(fresh(x).logits, expected)
    merge_lora(model)
    plain = transformers.ViTForImageClassification(config).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(plain(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_vit_mae_adapters_train_and_round_trip(tmp_path):
    config = tiny(transformers.ViTMAEConfig)
    config.mask_ratio = 0.0
    base = transformers.ViTMAEModel(config).eval()
    model = inject_lora(copy.deepcopy(base), "attn", r=2, dropout=0.0)
    noise = torch.arange(16.0).expand(2, -1)
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x, noise=noise).last_hidden_state.square().mean().backward()
        opt.step()
    model.eval()
    path = save_lora(model, tmp_path / "mae.safetensors")
    fresh = load_lora(copy.deepcopy(base), path).eval()
    assert torch.equal(fresh(x, noise=noise).last_hidden_state, model(x, noise=noise).last_hidden_state)
    assert not torch.equal(base(x, noise=noise).last_hidden_state, model(x, noise=noise).last_hidden_state)


ROLES = ("q", "k", "v", "o", "fc1", "fc2")
SCHEMES = {
    # transformers 4.x
    "encoder.layer.{}.attention.attention.query": "q",
    "encoder.layer.{}.attention.attention.key": "k",
    "encoder.layer.{}.attention.attention.value": "v",
    "encoder.layer.{}.attention.output.dense": "o",
    "encoder.layer.{}.intermediate.dense": "fc1",
    "encoder.layer.{}.output.dense": "fc2",
    # transformers 5.x
    "layers.{}.attention.q_proj": "q",
    "layers.{}.attention.k_proj": "k",
    "layers.{}.attention.v_proj": "v",
    "layers.{}.attention.o_proj": "o",
    "layers.{}.mlp.fc1": "fc1",
    "layers.{}.mlp.fc2": "fc2",
}


@pytest.mark.parametrize("config_cls", ["ViTConfig", "ViTMAEConfig"])
@pytest.mark.parametrize("role", ROLES)
def test_each_role_finds_its_layer_in_the_installed_transformers_scheme(config_cls, role):
    model_cls = getattr(transformers, config_cls.replace("Config", "Model"))
    model = model_cls(tiny(getattr(transformers, config_cls)))
    inject_lora(model, [role], r=2)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    expected = [t.format(i) for i in range(2) for t, r in SCHEMES.items() if r == role]
    assert adapted == [n for n in expected if n in dict(model.named_modules())]
    assert len(adapted) == 2, f"transformers {transformers.__version__}: {adapted}"
