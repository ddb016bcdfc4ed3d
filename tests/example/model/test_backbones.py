"""Every backbone family the example accepts: a tiny random model of each, saved in its own folder
layout, trains and tests through the command line, with its own size, normalisation and feature."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import morph_detection
import pytest
import torch
from madlab.model.families import BackboneError, encode, load_backbone, siglip2_inputs
from madlab.model.network import MorphDetector

from example.run.test_closing import check_paths, closing, next_argv
from lora_vit import inject_lora, read_lora_metadata

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MEAN, STD = [0.41, 0.45, 0.52], [0.21, 0.26, 0.31]
RUN = ["num_epochs=1", "morphs_per_face=1", "batch_size=64", "use_early_stopping=false", "num_threads=1",
       "lora_target_modules=q,v", "lora_r=2", "embedded_data=lfw_subset", "face_crop=none"]


def _processor(folder: Path, size: int, **extra) -> None:
    values = {"image_mean": MEAN, "image_std": STD, "crop_size": {"height": size, "width": size},
              "size": {"shortest_edge": size}, "do_center_crop": True, **extra}
    (folder / "preprocessor_config.json").write_text(json.dumps(values))


def _text() -> dict:
    return dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)


def _vit(t):
    return t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, **TINY), add_pooling_layer=False)


def _vit_mae(t):
    return t.ViTMAEModel(t.ViTMAEConfig(image_size=32, patch_size=8, **TINY))


def _deit(t):
    return t.DeiTModel(t.DeiTConfig(image_size=32, patch_size=8, **TINY), add_pooling_layer=False)


def _dinov2(t):
    return t.Dinov2Model(t.Dinov2Config(image_size=32, patch_size=8, mlp_ratio=2, **_no_mlp(TINY)))


def _dinov2_reg(t):
    return t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
        image_size=32, patch_size=8, mlp_ratio=2, num_register_tokens=2, **_no_mlp(TINY)))


def _clip(t):
    return t.CLIPModel(t.CLIPConfig(vision_config=dict(image_size=32, patch_size=8, **TINY), text_config=_text(),
                                    projection_dim=16))


def _clip_vision(t):
    return t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **TINY))


def _siglip(t):
    return t.SiglipModel(t.SiglipConfig(vision_config=dict(image_size=32, patch_size=8, **TINY), text_config=_text()))


def _siglip2(t):
    return t.Siglip2Model(t.Siglip2Config(vision_config=dict(num_patches=16, patch_size=8, **TINY),
                                          text_config=_text()))


def _no_mlp(values: dict) -> dict:
    return {k: v for k, v in values.items() if k != "intermediate_size"}


# family -> (builder, the name its q projection has in the detector, feature)
FAMILIES: dict[str, tuple[Callable, str, str]] = {
    "vit": (_vit, "backbone.layers.0.attention.q_proj", "cls"),
    "vit_mae": (_vit_mae, "backbone.layers.0.attention.q_proj", "cls"),
    "deit": (_deit, "backbone.layers.0.attention.q_proj", "cls"),
    "dinov2": (_dinov2, "backbone.encoder.layer.0.attention.q_proj", "cls"),
    "dinov2_with_registers": (_dinov2_reg, "backbone.encoder.layer.0.attention.q_proj", "cls"),
    "clip": (_clip, "backbone.encoder.layers.0.self_attn.q_proj", "pooled"),
    "clip_vision_model": (_clip_vision, "backbone.encoder.layers.0.self_attn.q_proj", "pooled"),
    "siglip": (_siglip, "backbone.encoder.layers.0.self_attn.q_proj", "pooled"),
    "siglip2": (_siglip2, "backbone.encoder.layers.0.self_attn.q_proj", "pooled"),
}


def save_backbone(family: str, folder: Path) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = FAMILIES[family][0](transformers)
    model.save_pretrained(folder)
    extra = {"max_num_patches": 16, "patch_size": 8} if family == "siglip2" else {}
    _processor(folder, 32, **extra)
    return model


@pytest.fixture(scope="module")
def quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _overrides(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--override", item)]


def _train_and_test(backbone: list[str], out: Path, extra: list[str] = ()) -> dict:
    rc = morph_detection.main(["train", *backbone, "--output_dir", str(out), "--no_progress",
                               *_overrides([*RUN, *extra])])
    assert rc == 0
    rc = morph_detection.main(["test", "--model_path", str(out / "morph_detector.safetensors"),
                               "--output_dir", str(out), "--no_progress"])
    assert rc == 0
    return read_lora_metadata(out / "morph_detector.safetensors")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_tests_from_the_command_line(family: str, tmp_path: Path, quiet) -> None:
    original = save_backbone(family, tmp_path / family)
    meta = _train_and_test(["--backbone", str(tmp_path / family)], tmp_path / "out")
    spec = meta["backbone"]["spec"]
    assert spec["family"] == family
    assert spec["image_size"] == 32 and spec["mean"] == MEAN and spec["std"] == STD, "from preprocessor_config.json"
    assert spec["feature"] == FAMILIES[family][2]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overall"]["n_bona_fide"] == 20 and 0.0 <= metrics["overall"]["auc"] <= 1.0
    # The adapters sit on the family's own q and v projections (the logical targets resolved).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "morph_detector.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    q_name = FAMILIES[family][1]
    assert any(n.startswith(q_name + ".") for n in names), names[:6]
    assert any(n.startswith(q_name.replace("q_proj", "v_proj") + ".") for n in names)
    assert not any(".k_proj." in n for n in names), "only q and v were asked for"
    # The loaded backbone holds the saved weights, and (CLIP/SigLIP) no text tower.
    backbone, _ = load_backbone(tmp_path / family)
    state = backbone.state_dict()
    assert not any("text" in k for k in state)
    vision = getattr(original, "vision_model", original)
    ours = q_name.removeprefix("backbone.") + ".weight"
    theirs = dict(vision.named_parameters())
    match = [k for k in theirs if k.endswith(ours.split(".", 1)[1]) and ".0." in k and "q_proj" in k]
    assert match and torch.equal(state[ours], theirs[match[0]])


def _processor_patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """SigLIP2's own (PIL-backend, numpy) image processor's patch layout."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    return torch.from_numpy(convert_image_to_patches(image.numpy(), patch))


def _reference_feature(family: str, backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What each family's own documentation calls its image feature, computed independently."""
    if family == "siglip2":
        patches = torch.stack([_processor_patches(img, 8) for img in x])
        out = backbone(pixel_values=patches, pixel_attention_mask=torch.ones(len(x), 16, dtype=torch.long),
                       spatial_shapes=torch.tensor([[4, 4]] * len(x)))
        return out.pooler_output
    out = backbone(pixel_values=x)
    if family in ("clip", "clip_vision_model"):
        return backbone.post_layernorm(out.last_hidden_state[:, 0])  # CLIP's image embedding before projection
    if family == "siglip":
        return backbone.head(out.last_hidden_state)  # attention pooling: SigLIP has no CLS token
    return out.last_hidden_state[:, 0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_feature_is_the_familys_own(family: str, tmp_path: Path, quiet) -> None:
    save_backbone(family, tmp_path / family)
    backbone, spec = load_backbone(tmp_path / family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode(backbone, spec, x), _reference_feature(family, backbone, x))


def test_siglip2_patches_match_its_image_processor() -> None:
    x = torch.randn(3, 3, 24, 16)
    ours = siglip2_inputs(x, 8)
    assert torch.equal(ours["pixel_values"], torch.stack([_processor_patches(i, 8) for i in x]))
    assert ours["spatial_shapes"].tolist() == [[3, 2]] * 3


def test_image_size_override_interpolates_positions(tmp_path: Path, quiet) -> None:
    save_backbone("dinov2", tmp_path / "dinov2")
    meta = _train_and_test(["--backbone", str(tmp_path / "dinov2")], tmp_path / "out", ["image_size=48"])
    assert meta["backbone"]["spec"]["image_size"] == 48
    save_backbone("clip_vision_model", tmp_path / "clip")
    backbone, spec = load_backbone(tmp_path / "clip", image_size=48)
    assert spec.image_size == 48
    assert encode(backbone, spec, torch.randn(1, 3, 48, 48)).shape == (1, 32)
    with pytest.raises(BackboneError, match="image_size=50 must be a positive multiple of the"):
        load_backbone(tmp_path / "clip", image_size=50)


def test_folder_without_processor_config_uses_the_familys_defaults(tmp_path: Path, quiet) -> None:
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_STD

    save_backbone("dinov2", tmp_path / "d")
    (tmp_path / "d" / "preprocessor_config.json").unlink()
    _, spec = load_backbone(tmp_path / "d")
    assert list(spec.mean) == list(IMAGENET_DEFAULT_MEAN) and spec.image_size == 32
    save_backbone("clip", tmp_path / "c")
    (tmp_path / "c" / "preprocessor_config.json").unlink()
    _, spec = load_backbone(tmp_path / "c")
    assert list(spec.std) == list(OPENAI_CLIP_STD)


def test_siglip_o_adapts_encoder_and_pooling_head_projections(tmp_path: Path, quiet) -> None:
    """Logical ``o`` on SigLIP matches the encoder's ``self_attn.out_proj`` and the out_proj of its
    pooling head's ``nn.MultiheadAttention`` (which lora_vit adapts in place); the pooling head's own
    weights stay frozen, and the detector's head is the only module trained whole."""
    save_backbone("siglip", tmp_path / "s")
    model = inject_lora(MorphDetector(*load_backbone(tmp_path / "s")), ["o"], r=2, trainable=["[h]ead"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[0] for n in trainable} == {
        "backbone.encoder.layers.0.self_attn.out_proj", "backbone.encoder.layers.1.self_attn.out_proj",
        "backbone.head.attention.out_proj", "head"}
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable if n.startswith("backbone."))
    meta = _train_and_test(["--backbone", str(tmp_path / "s")], tmp_path / "out", ["lora_target_modules=q,v,o"])
    assert meta["backbone"]["spec"]["family"] == "siglip"


def test_unsupported_and_broken_backbones_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text('{"model_type": "swin"}')
    with pytest.raises(BackboneError, match="holds a 'swin' model; supported: vit, vit_mae, deit, dinov2"):
        load_backbone(tmp_path / "swin")
    with pytest.raises(BackboneError, match="needs its weights, offline"):
        load_backbone("timm:vit_small_patch14_dinov2")
    with pytest.raises(BackboneError, match="needs an architecture"):
        load_backbone("timm:")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(BackboneError, match=r"should be a \.safetensors file or a timm hub folder"):
        load_backbone("timm:vit_small_patch14_dinov2", str(tmp_path / "w.bin"))


# ---------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory: pytest.TempPathFactory):
    from timm_support import import_timm

    timm = import_timm()
    from timm.models import _hub

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28, embed_dim=32,
                              depth=2, num_heads=2)
    folder = tmp_path_factory.mktemp("timm_hub")
    _hub.save_for_hf(model, folder, safe_serialization=True)
    return model, folder


def test_timm_hub_folder_trains_and_tests(timm_vit, tmp_path: Path, quiet) -> None:
    model, folder = timm_vit
    meta = _train_and_test(["--backbone", "timm:vit_small_patch14_dinov2.lvd142m", "--backbone_weights",
                            str(folder)], tmp_path / "out")
    spec = meta["backbone"]["spec"]
    assert spec["family"] == "timm" and spec["image_size"] == 28 and spec["feature"] == "pooled"
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406]), "timm's pretrained_cfg, not 0.5"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "morph_detector.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    assert any("blocks.0.attn.qkv" in n for n in names), "q and v adapt their thirds of the fused qkv"
    backbone, _ = load_backbone("timm:vit_small_patch14_dinov2.lvd142m", str(folder))
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # The folder alone (its config.json names the architecture) is accepted too.
    _, spec2 = load_backbone(folder)
    assert spec2.source == "vit_small_patch14_dinov2"


def test_timm_architecture_with_a_safetensors_file(tmp_path: Path, quiet) -> None:
    """``timm:<arch>`` + a bare weights file: the architecture's own config (here at 32 px, the
    position embeddings resampled by timm's loader), its pretrained mean/std."""
    from timm_support import import_timm

    timm = import_timm()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    meta = _train_and_test(["--backbone", "timm:vit_tiny_patch16_224", "--backbone_weights", str(file)],
                           tmp_path / "out", ["image_size=32"])
    spec = meta["backbone"]["spec"]
    assert spec["image_size"] == 32 and spec["weights"] == str(file) and spec["hidden_size"] == 192
    backbone, _ = load_backbone("timm:vit_tiny_patch16_224", str(file), 32)
    assert torch.equal(backbone.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)
    wrong = tmp_path / "small.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(BackboneError, match="timm:vit_tiny_patch16_224"):
        load_backbone("timm:vit_tiny_patch16_224", str(wrong))


@pytest.mark.slow
def test_compare_on_a_dinov2_folder(tmp_path: Path, quiet, capsys) -> None:
    save_backbone("dinov2", tmp_path / "dinov2")
    out = tmp_path / "cmp"
    rc = morph_detection.main(["compare", "--backbone", str(tmp_path / "dinov2"), "--output_dir", str(out),
                               "--no_progress", *_overrides(RUN)])
    assert rc == 0
    paths, result, follow = closing(capsys.readouterr().out)  # the table, a folder per strategy, the best model
    check_paths(paths)
    assert {p.name for p in paths} == {"compare.json", "compare.csv", "lora", "full_ft", "linear_probe"}
    assert result.startswith("lora AUC ") and next_argv(follow)[0] == "predict"
    assert Path(next_argv(follow)[2]).is_file()
    rows = json.loads((out / "compare" / "compare.json").read_text())
    # The strategies, then one row per shortcut baseline scored on the same test images (no model).
    assert [r["strategy"] for r in rows] == ["lora", "full_ft", "linear_probe", "shortcut:sharpness",
                                             "shortcut:contrast"]
    assert all(r["trainable_params"] is None for r in rows[3:])
    by = {r["strategy"]: r for r in rows}
    assert by["linear_probe"]["trainable_params"] == 33  # the head: 32 weights + bias
    assert by["lora"]["trainable_params"] == 33 + 2 * 2 * 2 * (32 + 32)  # 2 layers x q,v x r=2 x (in+out)
    assert by["full_ft"]["trainable_params"] > by["lora"]["trainable_params"]


# ---------------------------------------------------------------- MAE domain adaptation


def test_pretrain_continues_mae_on_a_vit_mae_folder(tmp_path: Path, quiet, capsys) -> None:
    import transformers

    torch.manual_seed(0)
    mae = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32, **TINY))
    mae.save_pretrained(tmp_path / "mae")
    _processor(tmp_path / "mae", 32)
    out = tmp_path / "adapt"
    rc = morph_detection.main(["pretrain", "--backbone", str(tmp_path / "mae"), "--output_dir", str(out),
                               "--no_progress", *_overrides(["pretrain_epochs=20", "pretrain_lr=3e-3",
                                                             "num_threads=1", "lora_r=4", "embedded_data=lfw_subset",
                                                             "face_crop=none"])])
    assert rc == 0
    adapted = out / "mae_backbone"
    paths, _, follow = closing(capsys.readouterr().out)  # next: train on the adapted folder, named by --backbone
    assert paths == [adapted.resolve()]
    assert next_argv(follow)[:3] == ["train", "--backbone", str(adapted.resolve())]
    info = json.loads((adapted / "pretrain.json").read_text())
    assert info["fixed_mask_loss"]["after"] < 0.95 * info["fixed_mask_loss"]["before"], info["fixed_mask_loss"]
    assert info["losses"][-1] < info["losses"][0]
    assert (adapted / "preprocessor_config.json").is_file()
    # The adapters were merged: a plain ViTMAE folder whose encoder moved, decoder included.
    again = transformers.ViTMAEForPreTraining.from_pretrained(adapted)
    q = "vit.layers.0.attention.q_proj.weight"
    assert not torch.equal(again.state_dict()[q], mae.state_dict()[q])
    assert not any("lora" in k for k in again.state_dict())
    meta = _train_and_test(["--backbone", str(adapted)], tmp_path / "out")
    assert meta["backbone"]["spec"]["family"] == "vit_mae" and meta["backbone"]["spec"]["mean"] == MEAN
    # Only vit_mae folders can be pretrained further, and an existing result is never overwritten.
    save_backbone("dinov2", tmp_path / "dinov2")
    assert morph_detection.main(["pretrain", "--backbone", str(tmp_path / "dinov2"), "--output_dir",
                                 str(tmp_path / "x"), "--no_progress"]) == 2
    assert morph_detection.main(["pretrain", "--backbone", str(tmp_path / "mae"), "--output_dir", str(out),
                                 "--no_progress"]) == 2


def test_rslora_and_init_reach_the_adapters_and_survive_the_file(tmp_path: Path, quiet) -> None:
    from madlab.io.config import Config, apply_overrides
    from madlab.model.checkpoint import load_weights, save_model
    from madlab.model.network import apply_strategy

    from lora_vit import LoRALinear

    save_backbone("clip_vision_model", tmp_path / "clip")
    config = apply_overrides(Config(), ["lora_target_modules=q,v", "lora_r=4", "lora_alpha=8",
                                        "lora_use_rslora=true", "lora_init=kaiming"])
    model = MorphDetector(*load_backbone(tmp_path / "clip"))
    apply_strategy(model, config)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and all(m.use_rslora and m.init == "kaiming" for m in layers)
    assert layers[0].scalings == (8 / 2.0,), "alpha / sqrt(r), not alpha / r"
    save_model(model, tmp_path / "m.safetensors", {"x": 1}, use_lora=True, head_only=False)
    fresh = load_weights(MorphDetector(*load_backbone(tmp_path / "clip")), tmp_path / "m.safetensors", True)
    again = [m for m in fresh.modules() if isinstance(m, LoRALinear)]
    assert all(m.use_rslora for m in again) and again[0].scalings == (4.0,)


def test_a_folder_missing_encoder_weights_is_refused_not_filled_randomly(tmp_path: Path, quiet) -> None:
    from safetensors.torch import load_file, save_file

    save_backbone("dinov2", tmp_path / "d")
    state = load_file(tmp_path / "d" / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layer.1." not in k}, tmp_path / "d" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(BackboneError, match=r"lacks \d+ weights of its 'dinov2' vision encoder"):
        load_backbone(tmp_path / "d")


def test_compare_overwrite_reaches_train_only_and_every_child_command_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compare --overwrite`` once passed ``--overwrite`` to ``test`` too, which has no such flag."""
    import subprocess

    from madlab.io.config import Config
    from madlab.run import app

    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        summary = {"trainable_params": 1, "checkpoint_bytes": 1024, "train_seconds": 1.0, "peak_rss_mb": 1.0,
                   "train_state_mb": 0.0, "best_epoch": 0}
        metrics = {"overall": {"d_eer": 0.5, "auc": 0.5}, "worst_case": {"d_eer": {"value": 0.5}}}
        (out / "train_summary.json").write_text(json.dumps(summary))
        (out / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(app.subprocess, "run", fake_run)
    config = Config(backbone=str(tmp_path / "some-folder"), output_dir=str(tmp_path / "out"))
    env = app.Env(cache_dir=tmp_path / "cache", progress=False, say=lambda _: None)
    app.run_compare(config, [], env, Path(morph_detection.__file__), overwrite=True)
    parser = morph_detection.build_parser()
    assert [c[2] for c in calls] == ["train", "test"] * len(app.COMPARE_STRATEGIES)
    for cmd in calls:
        assert ("--overwrite" in cmd) == (cmd[2] == "train"), cmd
        parser.parse_args(cmd[2:])  # exits (SystemExit) on an argument the command does not take
