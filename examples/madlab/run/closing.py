"""The lines every command ends with: what it wrote (full paths), its result in one line, and the
command a user runs next, so that nobody has to scroll back to find the model file."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.report import headline
from ..io.config import Config
from ..model.checkpoint import read_metadata
from ..model.named import NAMED, is_small_vit
from .app import COMPARE_DIR, COMPARE_STRATEGIES, MODEL_FILE
from .detector import EXPORT_FORMAT

__all__ = ["SCRIPT", "Closing", "after_compare", "after_default_run", "after_export", "after_predict",
           "after_pretrain", "after_protocol", "after_test", "after_train"]

# How the docs run the example (from the repository root); the next command is written the same way.
SCRIPT = "python examples/morph_detection.py"
WROTE, RESULT, NEXT = "wrote:", "result:", "next:"


@dataclass
class Closing:
    """What a command wrote (files or folders, made absolute), its result and the next command."""

    wrote: Sequence[str | Path]
    result: str
    next: str

    def __str__(self) -> str:
        lines = [WROTE, *(f"  {Path(p).resolve()}" for p in self.wrote), f"{RESULT} {self.result}",
                 f"{NEXT} {self.next}"]
        return "\n".join(lines)


def _command(*words: str | Path) -> str:
    return " ".join([SCRIPT, *(shlex.quote(str(w)) for w in words)])


def _data_flag(data: str | None) -> list[str]:
    return ["--data", data] if data else []


def after_train(summary: dict[str, Any]) -> Closing:
    """``train``: the model file and logs; next, test it on the split training never saw."""
    model = Path(summary["model_path"]).resolve()
    stopped = " (stopped early)" if summary["stopped_early"] else ""
    return Closing(summary["written"],
                   f"best epoch {summary['best_epoch']} of {summary['epochs_run']}{stopped}:"
                   f" dev D-EER {100 * summary['best_dev_eer']:.1f}%, threshold {summary['threshold']:.4f}",
                   _command("test", "--model_path", model, "--output_dir", model.parent))


def after_test(report: dict[str, Any], model_path: str | Path) -> Closing:
    """``test``: scores, metrics and plots; next, score new photos with the same model."""
    out = Path(report["written"][0]).parent
    return Closing(report["written"], headline(report),
                   _command("predict", "--model_path", Path(model_path).resolve(), "--input", "PHOTOS",
                            "--output", out / "predictions.csv"))


def after_default_run(summary: dict[str, Any], report: dict[str, Any]) -> Closing:
    """The no-argument run (train, then test): everything it wrote; next, the same on your own data."""
    return Closing([*summary["written"], *report["written"]], f"smoke test: {headline(report)}",
                   _command("train", "--data", "YOUR_DATA", "--output_dir", "runs/mine")
                   + "   (the data layouts and the steps: docs/detector.md)")


def after_predict(model_path: str | Path, output: str | Path, crops: str | Path | None, line: str) -> Closing:
    """``predict``: the CSV (and the crops); next, export a model file, or nothing for an export."""
    model = Path(model_path).resolve()
    exported = read_metadata(model).get("format") == EXPORT_FORMAT
    follow = ("none needed: the CSV holds a decision per photo" if exported else
              _command("export", "--model_path", model, "--output", model.with_name("merged.safetensors")))
    # The crops folder exists only once a face was cropped into it.
    return Closing([output, *([crops] if crops is not None and Path(crops).is_dir() else [])], line, follow)


def after_export(result: dict[str, Any], line: str) -> Closing:
    """``export``: the merged file; next, predict with it."""
    merged = Path(result["output"]).resolve()
    return Closing([merged], line, _command("predict", "--model_path", merged, "--input", "PHOTOS",
                                            "--output", merged.with_name("predictions.csv")))


def after_pretrain(folder: Path, config: Config) -> Closing:
    """``pretrain``: the backbone folder; next, train on it. A named backbone or the small ViT is
    found in the cache again; a folder adapted from ``--backbone`` must be named by ``--backbone``."""
    adapted = config.backbone not in NAMED and not is_small_vit(config.backbone)
    backbone = ["--backbone", folder.resolve()] if adapted else []
    return Closing([folder], f"backbone ready in {folder.resolve()}",
                   _command("train", *_data_flag(config.data), *backbone))


def after_compare(output_dir: str | Path, rows: list[dict[str, Any]]) -> Closing:
    """``compare``: the table and one folder per strategy; next, predict with the best one by test AUC."""
    out = Path(output_dir) / COMPARE_DIR
    trained = [r for r in rows if r["strategy"] in COMPARE_STRATEGIES]
    best = max(trained, key=lambda r: r["auc"])
    result = ", ".join(f"{r['strategy']} AUC {r['auc']:.3f}" for r in trained) + " (test split)"
    model = (out / best["strategy"] / MODEL_FILE).resolve()
    return Closing([out / "compare.json", out / "compare.csv", *(out / s for s in COMPARE_STRATEGIES)], result,
                   _command("predict", "--model_path", model, "--input", "PHOTOS",
                            "--output", model.with_name("predictions.csv")))


def after_protocol(kind: str, out: Path, rows: list[dict[str, Any]], data: str | None) -> Closing:
    """``protocol``: the table and one folder per training run; next, the other protocol."""
    unseen = [r for r in rows if r["seen_in_training"] == "NO" and not r["subset"].startswith("shortcut:")]
    if unseen:
        worst = min(unseen, key=lambda r: r["auc"])
        result = (f"worst AUC on a method never seen in training: {worst['auc']:.3f}"
                  f" ({worst['subset']}, attacks={worst['attacks']})")
    else:
        result = "every tested method was seen in training (see the table above)"
    follow = (_command("protocol", "cross-dataset", *_data_flag(data), "--test_data", "OTHER_DATA")
              if kind == "leave-one-method-out" else
              _command("protocol", "leave-one-method-out", *_data_flag(data)))
    return Closing([out / "protocol.json", out / "protocol.csv", out], result, follow)
