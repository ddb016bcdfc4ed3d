"""The commands of docs/detector.md (the detector path) and docs/guide.md run as written.

Run, in an empty folder and in the pages' order: detector.md's Python block (it writes the toy
data set), then each ``morph_detection.py`` command of train/test/predict/export. One change keeps
this to seconds: ``train`` gets a tiny random ViT folder as ``--backbone``, one epoch and one
thread, appended after the page's own arguments (which they override). guide.md's commands run on
a small folder of generated images standing in for its ``/data/mine``. Parsed only, with the
example's own parser: the default run (minutes) and ``compare`` (three trainings); ``pip`` lines
are checked by tests/test_docs.py. README.md's and examples/README.md's commands run in
tests/example/test_readme_commands.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import morph_detection
import pytest

from example.cli import cli, overrides
from example.run.test_closing import check_paths, closing
from example.run.test_predict import data_tree, tiny_vit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RUN = {"train", "test", "predict", "export"}  # what runs; anything else is parsed only
FAST = ["num_epochs=1", "num_threads=1", "num_workers=0", "batch_size=8"]


def blocks(page: str, language: str) -> list[str]:
    return [m[2] for m in FENCE.finditer((DOCS / page).read_text()) if m[1] == language]


def example_commands(page: str) -> list[list[str]]:
    """Every ``python examples/morph_detection.py ...`` line of the page's bash blocks, as its arguments."""
    commands = []
    for block in blocks(page, "bash"):
        for line in block.strip().splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "examples/morph_detection.py"]:
                commands.append(words[2:])
    return commands


def run_in_order(commands: list[list[str]], backbone: Path, extra_train: list[str] = ()) -> list[str]:
    """Run (or parse) each command; return the subcommands that really ran."""
    ran = []
    for argv in commands:
        args, default_run = morph_detection.parse_args(argv)  # exits on anything the parser refuses
        if default_run or args.command not in RUN:
            continue
        more = ["--backbone", str(backbone), *overrides([*FAST, *extra_train])] if args.command == "train" else []
        rc, out, err = cli(*argv, *more)
        assert rc == 0, (argv, err[-2000:])
        check_paths(closing(out)[0])
        ran.append(args.command)
    return ran


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_VIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_detector_path_runs_as_written(workdir: Path) -> None:
    (code,) = blocks("detector.md", "python")
    exec(compile(code, "docs/detector.md", "exec"), {"__name__": "__doc__"})
    assert len(list(Path("toy_data").rglob("*.png"))) == 89  # 60 bona fides, 15 + 7 + 7 morphs
    commands = example_commands("detector.md")
    ran = run_in_order(commands, tiny_vit(workdir / "vit"))
    assert ran == ["train", "test", "predict", "export"], "the page lost a step of its path"
    assert Path("runs/toy/predictions.csv").is_file() and Path("runs/toy/merged.safetensors").is_file()
    assert any(morph_detection.parse_args(argv)[1] for argv in commands), "the smoke test is the path's step 2"


def test_guide_commands_run_on_a_small_folder(workdir: Path) -> None:
    data = data_tree(workdir / "mine", 8)
    commands = [[str(data) if word == "/data/mine" else word for word in argv]
                for argv in example_commands("guide.md")]
    # The generated images hold no faces: read whole, as the page's own data would not need.
    ran = run_in_order(commands, tiny_vit(workdir / "vit"), extra_train=["face_crop=none"])
    assert ran == ["train", "train", "train", "test"]
    assert all(Path("runs", size, "morph_detector.safetensors").is_file() for size in ("small", "medium", "large"))
