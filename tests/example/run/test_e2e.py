"""End to end: the morph-detection example trains, saves, rebuilds from the file alone and reports honestly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import morph_detection
import numpy as np
import pytest
import torch
from madlab.data.images import ImageDataset
from madlab.evaluation.metrics import apcer_bpcer, auc, d_eer
from madlab.evaluation.report import read_scores_csv
from madlab.io.config import Config, apply_overrides
from madlab.model.backbone import BackboneError, load_backbone
from madlab.model.network import MorphDetector
from madlab.run import training
from madlab.run.inference import predict
from madlab.run.training import BestEpoch, class_weights, train
from madlab.sources.lfw import embedded_samples

from lora_vit import read_lora_metadata

# The lfw_subset fixture, whole images: fast, and the pipeline is the same (ORL runs in test_example_orl.py).
TINY = ["backbone=mae-vit-tiny",
        "pretrain_epochs=2", "num_epochs=3", "morphs_per_face=1", "batch_size=32", "learning_rate=3e-3",
        "use_early_stopping=false", "min_delta=0", "embedded_data=lfw_subset", "face_crop=none"]


def _overrides(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--override", item)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    rc = morph_detection.main(["train", "--output_dir", str(out), "--cache_dir", str(cache), "--no_progress",
                               *_overrides(TINY)])
    assert rc == 0
    assert list(cache.glob("mae-vit-tiny-*/config.json")), "the default backbone was pretrained and cached"
    rc = morph_detection.main(["test", "--model_path", str(out / "morph_detector.safetensors"), "--no_progress",
                               "--output_dir", str(out)])
    assert rc == 0
    return out


def test_outputs_exist_with_the_right_columns(trained: Path) -> None:
    for name in ("morph_detector.safetensors", "metrics.json", "scores.csv", "train_log.csv", "roc.png",
                 "det.png", "score_histogram.png"):
        assert (trained / name).stat().st_size > 0, name
    with (trained / "scores.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["path", "label", "method", "score", "p_morph"]
    # embedded test pool: 20 bona fides, 10 morphs per method at morphs_per_face=1
    assert sum(r["label"] == "0" for r in rows) == 20
    assert {r["method"] for r in rows if r["label"] == "1"} == {"blend", "splice"}
    assert all(r["path"].startswith("lfw_subset/test/") for r in rows), "only the test split is scored"
    with (trained / "train_log.csv").open() as handle:
        log = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in log] == [1, 2, 3]
    assert sum(int(r["best"]) for r in log) == 1


def test_metrics_agree_with_scores_csv(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    _, labels, methods, scores = read_scores_csv(trained / "scores.csv")
    assert metrics["overall"]["d_eer"] == pytest.approx(d_eer(scores, labels)["eer"])
    assert metrics["overall"]["auc"] == pytest.approx(auc(scores, labels))
    tau = metrics["threshold"]["value"]
    assert metrics["overall"]["at_threshold"] == apcer_bpcer(scores, labels, tau)
    for method, m in metrics["per_method"].items():
        keep = (labels == 0) | (np.array(methods) == method)
        assert m["n_morph"] == int((np.array(methods) == method).sum())
        assert m["d_eer"] == pytest.approx(d_eer(scores[keep], labels[keep])["eer"])
    worst = max(metrics["per_method"], key=lambda k: metrics["per_method"][k]["d_eer"])
    assert metrics["worst_case"]["d_eer"]["value"] == metrics["per_method"][worst]["d_eer"]


def test_threshold_and_checkpoint_come_from_dev_not_test(trained: Path) -> None:
    meta = read_lora_metadata(trained / "morph_detector.safetensors")
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["threshold"] == meta["threshold"], "the threshold is the one fixed at training time"
    assert metrics["model"]["test_time_flip"] is False, "attacks=given scores one view"
    config = Config.from_dict(meta["config"])
    assert config.lora_r == 8 and config.use_lora and config.num_epochs == 3
    with (trained / "train_log.csv").open() as handle:
        log = list(csv.DictReader(handle))
    best = min(log, key=lambda r: float(r["dev_loss"]))
    assert meta["training"]["best_epoch"] == int(best["epoch"])
    assert int(best["best"]) == 1
    # The restored weights really are the best epoch's: recompute its dev loss from the file.
    samples = embedded_samples(config.seed, config.morph_methods, config.morphs_per_face,
                               (config.train_val_pct, config.dev_pct))
    model = MorphDetector(*load_backbone(meta["backbone"]["path"]), config.dropout_p)
    from madlab.model.checkpoint import load_weights

    load_weights(model, trained / "morph_detector.safetensors", use_lora=True)
    train_labels = np.array([s.label for s in samples if s.split == "train"])
    dev = ImageDataset([s for s in samples if s.split == "dev"], model.image_size)
    _, dev_loss = predict(model, dev, 64, class_weights(train_labels, None), progress=False)
    assert dev_loss == pytest.approx(float(best["dev_loss"]), abs=1e-5)


def test_test_time_flip_chooses_the_epoch_and_threshold_on_both_views(trained: Path, cache: Path,
                                                                      tmp_path: Path) -> None:
    # ``trained`` first, so that ``cache`` already holds the pretrained backbone and this run reuses it.
    rc = morph_detection.main(["train", "--output_dir", str(tmp_path), "--cache_dir", str(cache), "--no_progress",
                               *_overrides([*TINY, "test_time_flip=true"])])
    assert rc == 0
    meta = read_lora_metadata(tmp_path / "morph_detector.safetensors")
    config = Config.from_dict(meta["config"])
    assert config.test_time_flip is True and config.flip_scores
    with (tmp_path / "train_log.csv").open() as handle:
        best = min(csv.DictReader(handle), key=lambda r: float(r["dev_loss"]))
    samples = embedded_samples(config.seed, config.morph_methods, config.morphs_per_face,
                               (config.train_val_pct, config.dev_pct))
    from madlab.model.checkpoint import load_weights

    model = MorphDetector(*load_backbone(meta["backbone"]["path"]), config.dropout_p, flip_average=True)
    load_weights(model, tmp_path / "morph_detector.safetensors", use_lora=True)
    weights = class_weights(np.array([s.label for s in samples if s.split == "train"]), None)
    dev = ImageDataset([s for s in samples if s.split == "dev"], model.image_size)
    both_views, loss = predict(model, dev, 64, weights, progress=False)
    assert loss == pytest.approx(float(best["dev_loss"]), abs=1e-5)
    model.flip_average = False
    one_view, _ = predict(model, dev, 64, weights, progress=False)
    # The dev_eer threshold is one of the dev scores it was fixed on: here both views' (the tiny
    # model's two views differ by up to about 0.008, too little to move its dev loss visibly).
    tau = meta["threshold"]["value"]
    assert np.abs(both_views - tau).min() <= 1e-6
    assert np.abs(one_view - tau).min() > 1e-4
    rc = morph_detection.main(["test", "--model_path", str(tmp_path / "morph_detector.safetensors"), "--no_progress",
                               "--output_dir", str(tmp_path / "test")])
    assert rc == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["model"]["test_time_flip"] is True


def _with_config(source: Path, target: Path, **changes: object) -> Path:
    """A copy of the model file ``source`` whose stored config has ``changes`` (``None``: key removed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as handle:
        header = dict(handle.metadata())
    meta = json.loads(header["user"])
    for key, value in changes.items():
        if value is None:
            meta["config"].pop(key)
        else:
            meta["config"][key] = value
    save_file(load_file(str(source)), str(target), metadata={**header, "user": json.dumps(meta)})
    return target


def test_a_model_file_scores_as_its_config_says_and_older_files_with_one_view(trained: Path,
                                                                              tmp_path: Path) -> None:
    from madlab.io.config import ConfigError
    from madlab.run.detector import Detector

    source = trained / "morph_detector.safetensors"
    one = Detector.load(source)
    assert one.config.test_time_flip is None and not one.model.flip_average  # attacks=given: one view
    # A generated-mode file follows its mode's default (both views) ...
    flipped = Detector.load(_with_config(source, tmp_path / "generated.safetensors", attacks="generated"))
    assert flipped.model.flip_average
    x = torch.randn(3, 3, one.image_size, one.image_size, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(flipped.score(x), (one.score(x) + one.score(x.flip(-1))) / 2, rtol=0, atol=1e-5)
    # ... but a file from before the key fixed its threshold on one view, and keeps it.
    older = _with_config(source, tmp_path / "older.safetensors", attacks="generated", test_time_flip=None,
                         test_time_shift=None)
    assert not Detector.load(older).model.flip_average
    with pytest.raises(ConfigError, match="--override test_time_flip=false does not match the model file"):
        Detector.load(tmp_path / "generated.safetensors", overrides=["test_time_flip=false"])
    # A file that rolls its views scores their mean; one from before test_time_shift scores without rolls.
    rolled = Detector.load(_with_config(source, tmp_path / "rolled.safetensors", test_time_shift=1))
    rolls = [x.roll(r, dims=(-2, -1)) for r in [(0, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)]]
    np.testing.assert_allclose(rolled.score(x), np.mean([one.score(v) for v in rolls], axis=0), rtol=0, atol=1e-5)
    assert Detector.load(older).model.shift == 0
    with pytest.raises(ConfigError, match="--override test_time_shift=0 does not match the model file"):
        Detector.load(tmp_path / "rolled.safetensors", overrides=["test_time_shift=0"])


def test_test_rebuilds_from_the_file_alone_and_reproduces(trained: Path, tmp_path: Path) -> None:
    rc = morph_detection.main(["test", "--model_path", str(trained / "morph_detector.safetensors"),
                               "--output_dir", str(tmp_path), "--no_progress", "--override", "use_lora=True"])
    assert rc == 0
    first = read_scores_csv(trained / "scores.csv")
    again = read_scores_csv(tmp_path / "scores.csv")
    assert first[0] == again[0]
    np.testing.assert_allclose(first[3], again[3], rtol=0, atol=1e-7)


def test_seed_style_override_is_checked_against_the_file(trained: Path, tmp_path: Path, capsys) -> None:
    rc = morph_detection.main(["test", "--model_path", str(trained / "morph_detector.safetensors"),
                               "--output_dir", str(tmp_path), "--no_progress",
                               "--override", "use_lora=True", "--override", "lora_r=4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "lora_r=4" in err and "lora_r=8" in err  # the seed's r=4 against the file's r=8
    assert not (tmp_path / "scores.csv").exists()


def test_missing_model_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    rc = morph_detection.main(["test", "--model_path", str(tmp_path / "nope.safetensors")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- strategies on a random tiny ViT


def _tiny_detector(tmp_path: Path) -> MorphDetector:
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    return MorphDetector(*load_backbone(tmp_path / "vit"), 0.0)


def _snapshot(model: MorphDetector) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sets():
    samples = embedded_samples(0, ["blend"], 1, (0.6, 0.2))
    return (ImageDataset([s for s in samples if s.split == "train"][::4], 16),  # 15 bona fide, 15 morphs
            ImageDataset([s for s in samples if s.split == "dev"], 16))


class LastEpoch(BestEpoch):
    """Every epoch counts as the best, so that training ends with the last epoch's weights."""

    def update(self, epoch: int, dev_loss: float, dev_eer: float, named: dict) -> bool:
        self.best = None
        return super().update(epoch, dev_loss, dev_eer, named)


@pytest.mark.parametrize("strategy", ["gradual_unfreeze", "freeze_except_lastN"])
def test_freeze_strategies_train_what_they_unfreeze(tmp_path: Path, strategy: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_detector(tmp_path)
    before = _snapshot(model)
    # A negative min_delta (which once did this) is refused now: keep the last epoch another way.
    monkeypatch.setattr(training, "BestEpoch", LastEpoch)
    config = apply_overrides(Config(), [
        "use_lora=false", f"freeze_strategy={strategy}", "freeze_lastN=1", "warmup_epochs=1", "mid_epochs=2",
        "num_epochs=3", "use_early_stopping=false", "selection_metric=dev_loss", "learning_rate=1e-2",
        "batch_size=16",
    ])
    train_set, dev_set = _sets()
    train(model, train_set, dev_set, config, tmp_path / "log.csv", progress=False, say=lambda _: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "head.weight" in changed
    assert any(k.startswith("backbone.layers.2.") for k in changed), "the last block trains"
    first_block = any(k.startswith("backbone.layers.0.") for k in changed)
    # gradual_unfreeze reaches the whole backbone at mid_epochs; freeze_except_lastN never does.
    assert first_block == (strategy == "gradual_unfreeze")


def test_backbone_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match=r"config\.json"):
        load_backbone(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(BackboneError, match="holds a 'bert' model; supported: vit, vit_mae, deit, dinov2"):
        load_backbone(tmp_path / "bert")


def test_vit_mae_checkpoint_loads_without_masking(tmp_path: Path) -> None:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    mae = ViTMAEForPreTraining(ViTMAEConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
                                            decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                            decoder_intermediate_size=32, mask_ratio=0.75))
    mae.save_pretrained(tmp_path / "mae")
    vit, spec = load_backbone(tmp_path / "mae")
    assert spec.family == "vit_mae" and spec.feature == "cls" and spec.image_size == 16
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = vit(pixel_values=x).last_hidden_state, vit(pixel_values=x).last_hidden_state
    assert a.shape == (2, 17, 32), "every patch is seen (16 patches + CLS), none masked"
    assert torch.equal(a, b), "inference is deterministic"
    torch.testing.assert_close(vit.embeddings.patch_embeddings.projection.weight,
                               mae.vit.embeddings.patch_embeddings.projection.weight)


def test_metrics_json_carries_shortcuts_verdict_and_data_report(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics["shortcuts"]) == {"sharpness", "contrast"}
    for base in metrics["shortcuts"].values():
        assert base["threshold"]["rule"] == metrics["threshold"]["rule"], "the detector's rule, on dev"
        assert 0.0 <= base["overall"]["d_eer"] <= 1.0 and base["overall"]["n_morph"] == metrics["overall"]["n_morph"]
    assert len(metrics["shortcut_verdict"]) == 2
    assert metrics["data"]["counts"]["test"] == {"bona_fide": 20, "morph/blend": 10, "morph/splice": 10}
    assert any("residual identity leakage" in n for n in metrics["data"]["notes"])


def test_metrics_json_gives_every_figure_its_interval_and_the_verdict_its_difference(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["bootstrap"]["unit"] == "identity" and metrics["bootstrap"]["resamples"] == 1000
    for part in (metrics["overall"], *metrics["per_method"].values(), metrics["shortcuts"]["sharpness"]["overall"]):
        for key in ("auc", "d_eer", "bpcer@apcer=1%", "bpcer@apcer=5%", "bpcer@apcer=10%"):
            low, high = part["intervals"][key]
            assert 0.0 <= low <= high <= 1.0
        assert "bpcer@apcer=1%" in part["flags"], "20 morphs per method are too few for APCER = 1%"
    for name, base in metrics["shortcuts"].items():
        low, high = base["auc_difference"]["interval"]
        verdict = next(line for line in metrics["shortcut_verdict"] if f"'{name}'" in line)
        assert "interval" in verdict
        assert verdict.startswith("The detector beats") == (low > 0)


def test_one_bona_fide_and_one_morph_get_no_bare_auc(trained: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("bona_fide", "morph"):
        (tmp_path / "two" / folder).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "two" / folder / "x.png")
    capsys.readouterr()
    rc = morph_detection.main(["test", "--model_path", str(trained / "morph_detector.safetensors"), "--no_progress",
                               "--output_dir", str(tmp_path / "out"), "--override", f"data={tmp_path / 'two'}"])
    out = capsys.readouterr().out
    assert rc == 0
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert overall.split()[3:5] == ["--", "--"], overall  # D-EER and AUC
    assert "AUC 1.000" not in out and "AUC 0.000" not in out
    assert "fewer than 2 images in a class" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "auc" in metrics["overall"]["flags"]
