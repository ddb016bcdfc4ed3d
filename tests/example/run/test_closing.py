"""Every command ends with what it wrote (full paths that exist), a one-line result and the next
command; the next command runs as printed (placeholders filled), so train -> test -> predict ->
export -> predict is followed here link by link. The default run takes --output_dir and the cache
flags, and names the subcommands for anything else."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import morph_detection
import pytest
from madlab.run import closing as closing_lines

from example.cli import cli, overrides
from example.run.test_predict import TRAIN, data_tree, image, tiny_vit


def closing(stdout: str) -> tuple[list[Path], str, str]:
    """The last ``wrote:`` block of a command's output, its ``result:`` and its ``next:`` line, which
    must be the very last lines printed."""
    lines = stdout.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line == "wrote:")
    paths = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        paths.append(Path(line[2:]))
    result, follow = lines[start + 1 + len(paths):]
    assert result.startswith("result: ") and follow.startswith("next: "), lines[start:]
    return paths, result.removeprefix("result: "), follow.removeprefix("next: ")


def check_paths(paths: list[Path]) -> None:
    assert paths
    for path in paths:
        assert path.is_absolute(), path
        assert path.exists(), f"printed {path}, which does not exist"


def next_argv(follow: str, **fill: str) -> list[str]:
    """The printed next command as argv for ``main`` (``python examples/morph_detection.py`` dropped),
    with placeholders such as PHOTOS filled."""
    words = shlex.split(follow)
    assert words[:2] == ["python", "examples/morph_detection.py"], follow
    return [fill.get(w, w) for w in words[2:]]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("closing")
    data = data_tree(root / "data", 8)
    photos = root / "photos"
    for i in range(3):
        image(photos / f"p{i}.png", 9000 + i)
    out = root / "out dir"  # a space: the next command must quote it
    outputs = {}
    cwd = Path.cwd()
    os.chdir(root / "data")  # a next command without an output path would write here
    try:
        _follow(root, data, photos, out, outputs)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in (root / "data").iterdir()) == ["dev", "test", "train"], "a file landed in the cwd"
    return {"out": out.resolve(), "outputs": outputs}


def _follow(root: Path, data: Path, photos: Path, out: Path, outputs: dict[str, str]) -> None:
    rc, outputs["train"], err = cli("train", "--data", str(data), "--backbone", str(tiny_vit(root / "vit")),
                                    "--output_dir", str(out), "--no_progress", *overrides(TRAIN))
    assert rc == 0, err
    for step in ("test", "predict", "export", "predict_export"):
        previous = list(outputs.values())[-1]
        argv = next_argv(closing(previous)[2], PHOTOS=str(photos))
        assert argv[0] == step.split("_")[0], (step, argv)
        rc, outputs[step], err = cli(*argv, "--no_progress") if step != "export" else cli(*argv)
        assert rc == 0, (step, err)


def test_train_lists_the_model_file_and_logs(chain) -> None:
    paths, result, _ = closing(chain["outputs"]["train"])
    check_paths(paths)
    assert chain["out"] / "morph_detector.safetensors" in paths
    assert chain["out"] / "train_log.csv" in paths
    # TRAIN runs 3 epochs without early stopping: the line names the best of them and how many ran.
    assert re.fullmatch(r"best epoch [123] of 3: dev D-EER \d+\.\d%, threshold -?\d+\.\d{4}", result), result
    summary = json.loads((chain["out"] / "train_summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["stopped_early"] is False


def test_train_result_says_when_early_stopping_ended_the_run() -> None:
    summary = {"written": [], "model_path": "m.safetensors", "best_epoch": 4, "epochs_run": 19,
               "stopped_early": True, "best_dev_eer": 0.125, "threshold": 0.5}
    assert closing_lines.after_train(summary).result == (
        "best epoch 4 of 19 (stopped early): dev D-EER 12.5%, threshold 0.5000")


def test_test_lists_scores_metrics_and_plots_with_their_folder(chain) -> None:
    paths, result, _ = closing(chain["outputs"]["test"])
    check_paths(paths)
    assert {p.name for p in paths} == {"scores.csv", "metrics.json", "roc.png", "det.png", "score_histogram.png"}
    assert {p.parent for p in paths} == {chain["out"]}
    assert result.startswith("AUC ") and " morph images" in result


def test_predict_and_export_close_with_their_files(chain) -> None:
    paths, result, follow = closing(chain["outputs"]["predict"])
    check_paths(paths)
    assert paths == [chain["out"] / "predictions.csv"]
    assert result.startswith("predict: 3 files: 3 scored")
    paths, result, _ = closing(chain["outputs"]["export"])
    check_paths(paths)
    assert paths == [chain["out"] / "merged.safetensors"] and result.startswith("exported ")
    paths, _, follow = closing(chain["outputs"]["predict_export"])
    check_paths(paths)
    assert follow.startswith("none needed"), "an export has nothing left to export"


def test_default_run_takes_output_and_cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real default run takes minutes (DINOv2 on ORL); its steps are stood in for, its wiring is not.
    seen = {}

    def train(config, env, resume=False, overwrite=False):
        seen["output_dir"], seen["cache_dir"], seen["progress"] = config.output_dir, env.cache_dir, env.progress
        model = Path(config.output_dir) / "morph_detector.safetensors"
        model.parent.mkdir(parents=True)
        model.write_bytes(b"")
        return {"model_path": str(model), "written": [str(model)]}

    def test(model_path, overrides_, env, output_dir=None, *rest):
        seen["test_out"] = output_dir
        (Path(output_dir) / "metrics.json").write_text("{}")
        m = {"auc": 0.9, "d_eer": 0.1, "n_bona_fide": 4, "n_morph": 8,
             "at_threshold": {"apcer": 0.125, "bpcer": 0.25}}
        return {"overall": m, "written": [str(Path(output_dir) / "metrics.json")]}

    monkeypatch.setattr(morph_detection, "run_train", train)
    monkeypatch.setattr(morph_detection, "run_test", test)
    out, cache = tmp_path / "smoke", tmp_path / "cache"
    rc, stdout, err = cli("--output_dir", str(out), "--cache_dir", str(cache), "--no_progress")
    assert rc == 0, err
    assert seen == {"output_dir": str(out), "cache_dir": cache, "progress": False, "test_out": str(out)}
    paths, result, follow = closing(stdout)
    check_paths(paths)
    assert paths == [out / "morph_detector.safetensors", out / "metrics.json"]
    assert result.startswith("smoke test: AUC 0.900")
    assert next_argv(follow.split("   (")[0])[:3] == ["train", "--data", "YOUR_DATA"]


@pytest.mark.parametrize("flag", ["--data", "--override", "--backbone"])
def test_default_run_names_the_subcommands_for_other_flags(flag: str) -> None:
    rc, _, err = cli(flag, "x")
    assert rc == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and repr(flag) in errors[0] and "train" in errors[0] and "test" in errors[0]
