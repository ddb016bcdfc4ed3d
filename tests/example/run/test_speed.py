"""The example on users' hardware: the bounded uint8 image cache, loaders, threads, precision,
compile, and log lines that suit a terminal or a job log."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import morph_detection
import numpy as np
import pytest
import torch
from madlab.data.images import ImageDataset, decode, make_loader
from madlab.data.samples import Sample
from madlab.io.config import Config, ConfigError, apply_overrides
from madlab.model.families import load_backbone
from madlab.model.network import MorphDetector
from madlab.run import speed
from madlab.run.speed import autocast, available_cores, inductor_options, resolve_compile, resolve_precision, threads
from madlab.run.training import predict
from PIL import Image

CPU = torch.device("cpu")


def _files(folder: Path, n: int, size: int = 40) -> list[Sample]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), i % 2, "bona_fide" if i % 2 == 0 else "blend", "train"))
    return samples


def test_cache_is_bounded_uint8_and_serves_what_decoding_serves(tmp_path: Path) -> None:
    samples = _files(tmp_path, 10)
    per_image = 3 * 16 * 16
    bounded = ImageDataset(samples, 16, cache_mb=4.5 * per_image / 2**20, num_workers=2)
    assert bounded.cached == 4 and not bounded.fully_cached
    assert bounded._cache.dtype == torch.uint8 and bounded._cache.nbytes == 4 * per_image
    off = ImageDataset(samples, 16, cache_mb=0)
    full = ImageDataset(samples, 16, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    assert off.cached == 0 and full.fully_cached
    for i in range(10):
        assert torch.equal(bounded[i][0], off[i][0]), "a cached image is the decoded image"
        expected = (decode(samples[i], 16).float() / 255 - torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)) / torch.tensor(
            [0.5, 0.6, 0.7]).view(3, 1, 1)
        torch.testing.assert_close(full[i][0], expected)
    pixels = np.asarray(Image.open(samples[0].path).convert("RGB").resize((16, 16), Image.BILINEAR), np.float32)
    assert np.abs(decode(samples[0], 16).permute(1, 2, 0).numpy() - pixels).mean() < 12, "the right image, resized"


def test_loader_uses_workers_only_for_what_is_not_cached(tmp_path: Path) -> None:
    samples = _files(tmp_path, 6)
    assert make_loader(ImageDataset(samples, 16), 4, 2).num_workers == 0
    partial = ImageDataset(samples, 16, cache_mb=0)
    loader = make_loader(partial, 4, 2)
    # Not persistent: each epoch starts its workers afresh, seeded from the loader's generator,
    # which the training state saves (a resumed run then draws what the uninterrupted one did).
    assert loader.num_workers == 2 and not loader.persistent_workers
    from_workers = torch.cat([x for x, _, _ in loader])
    in_process = torch.cat([x for x, _, _ in make_loader(partial, 4, 0)])
    assert torch.equal(from_workers, in_process)


def test_threads_default_to_the_cores_and_one_for_the_smoke_model() -> None:
    assert threads(Config(backbone="mae-vit-tiny")) == 1, "the small MAE ViT"
    assert threads(Config()) == available_cores(), "the default DINOv2"
    assert threads(apply_overrides(Config(), ["backbone=/models/dinov2"])) == available_cores()
    assert threads(apply_overrides(Config(), ["backbone=/models/dinov2", "num_threads=3"])) == 3
    with pytest.raises(ConfigError, match="num_threads must be >= 1"):
        apply_overrides(Config(), ["num_threads=0"])
    with pytest.raises(ConfigError, match="precision='fp16' is not one of"):
        apply_overrides(Config(), ["precision=fp16"])
    with pytest.raises(ConfigError, match="lora_init='zeros' is not one of"):
        apply_overrides(Config(), ["lora_init=zeros"])


def test_precision_and_compile_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config()
    assert resolve_precision(config, CPU) == "fp32" and not resolve_compile(config, CPU)
    # CPU bf16 only where it measured faster: a ViT-B-wide backbone on a CPU with AMX-bf16.
    for amx, width, expected in [(True, 768, "bf16"), (True, 1024, "bf16"), (True, 384, "fp32"),
                                 (True, None, "fp32"), (False, 768, "fp32"), (False, 1024, "fp32")]:
        monkeypatch.setattr(speed, "cpu_has_amx_bf16", lambda amx=amx: amx)
        assert resolve_precision(config, CPU, width) == expected, (amx, width)
    assert resolve_precision(apply_overrides(config, ["precision=fp32"]), CPU, 1024) == "fp32"
    forced = apply_overrides(config, ["precision=bf16", "compile=true"])
    assert resolve_precision(forced, CPU) == "bf16" and resolve_compile(forced, CPU)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert resolve_compile(config, cuda)
        assert resolve_precision(config, cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def _vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_bf16_scores_track_fp32(tmp_path: Path) -> None:
    model = MorphDetector(*load_backbone(_vit(tmp_path / "vit")), dropout_p=0.0)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    dataset = ImageDataset(_files(tmp_path / "img", 8), 16)
    fp32, _ = predict(model, dataset, 4, progress=False)
    bf16, _ = predict(model, dataset, 4, progress=False, precision="bf16")
    assert fp32.dtype == bf16.dtype == np.float64
    np.testing.assert_allclose(bf16, fp32, atol=0.02)
    assert not np.array_equal(bf16, fp32), "autocast really ran in bf16"
    with autocast("bf16", CPU):
        assert model(dataset[0][0][None]).dtype == torch.float32, "logits leave the model in fp32"


def _overrides(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--override", item)]


def test_log_file_gets_one_line_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal (pytest captures stderr) there is no progress bar, even without --no_progress."""
    vit = _vit(tmp_path / "vit")
    capsys.readouterr()  # saving the folder printed transformers' own bars
    rc = morph_detection.main(["train", "--backbone", str(vit), "--output_dir",
                               str(tmp_path / "out"), *_overrides(["num_epochs=2", "morphs_per_face=1",
                                                                   "use_early_stopping=false", "precision=bf16",
                                                                   "num_threads=1", "embedded_data=lfw_subset",
                                                                   "face_crop=none"])])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "precision bf16, eager" in out


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    vit = _vit(tmp_path / "vit")
    logs = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        rc = morph_detection.main(["train", "--backbone", str(vit), "--output_dir", str(out), "--no_progress",
                                   *_overrides(["num_epochs=2", "morphs_per_face=1", "use_early_stopping=false",
                                                "dropout_p=0", "lora_dropout=0", "use_cls_aug=false",
                                                f"compile={mode}", "num_threads=1", "embedded_data=lfw_subset",
                                                "face_crop=none"])])
        assert rc == 0
        logs[mode] = (out / "train_log.csv").read_text().splitlines()
    eager = [list(map(float, line.split(",")[1:4])) for line in logs["false"][1:]]
    fused = [list(map(float, line.split(",")[1:4])) for line in logs["true"][1:]]
    np.testing.assert_allclose(fused, eager, rtol=1e-3, atol=1e-4)


def test_compile_options_name_the_cpu_vector_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for capability, bits in [("AVX512", 512), ("AVX2", 256), ("DEFAULT", 1)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert inductor_options() == {"cpp.simdlen": bits}, capability
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX10")
    assert inductor_options() == {}, "an unknown capability leaves inductor's choice alone"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert inductor_options() == {}, "on ARM, DEFAULT does not mean scalar code"


_COMPILED_VS_EAGER = """
import torch
from torch import nn
import lora_vit
from madlab.run.speed import compiled
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32))
lora_vit.inject_lora(model, ["0", "3"], r=8, alpha=16, dropout=0.0)
x = torch.randn(16, 17, 32)
print((compiled(model, True)(x) - model(x)).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector capabilities")
def test_compiled_model_survives_a_cache_shared_across_cpu_capabilities(tmp_path: Path) -> None:
    """A graph cached by a run at this CPU's capability, then served to a run under AVX2.

    Without the width in the cache key (torch 2.13), on an AVX-512 CPU the second run read and
    wrote 16 floats where its vectors held 8: NaN, or glibc aborting. On an AVX2 CPU both runs
    are AVX2 and the test passes either way.
    """
    examples = Path(__file__).resolve().parents[3] / "examples"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(examples)}
    for capability in (None, "avx2"):
        run_env = dict(env)
        run_env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            run_env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", _COMPILED_VS_EAGER], capture_output=True, text=True,
                              env=run_env, timeout=300)
        assert done.returncode == 0, (capability, done.stderr[-2000:])
        assert float(done.stdout.split()[-1]) < 1e-5, (capability, done.stdout)
