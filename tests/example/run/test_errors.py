"""The morph-detection example's tidy-up invariants: one error base, one atomic writer, inference beside evaluation."""

from __future__ import annotations

import ast
import contextlib
import io
import os
from pathlib import Path

import morph_detection
import pytest
from madlab.data.samples import DataError
from madlab.evaluation.metrics import MetricsError
from madlab.io import files
from madlab.io.config import ConfigError
from madlab.io.errors import MadlabError
from madlab.model.backbone import BackboneError
from madlab.model.checkpoint import CheckpointError
from madlab.run import app

from lora_vit import LoRAError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_every_example_error_shares_one_base() -> None:
    for cls in (BackboneError, CheckpointError, ConfigError, DataError, MetricsError):
        assert issubclass(cls, MadlabError), cls


@pytest.mark.parametrize("error", [DataError("bad data"), MadlabError("bad thing"), LoRAError("bad adapter")])
def test_cli_reports_the_base_and_lora_errors_as_one_line(monkeypatch, error: Exception) -> None:
    def boom(*_, **__):
        raise error

    monkeypatch.setattr(morph_detection, "run_train", boom)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = morph_detection.main(["train", "--output_dir", "/nonexistent/never-written"])
    assert rc == 2
    assert err.getvalue().strip().splitlines()[-1] == f"error: {error}"


def test_write_atomically_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    files.write_text_atomically(target, "old\r\n")
    assert target.read_bytes() == b"old\r\n" and oct(target.stat().st_mode & 0o777) == "0o644"

    with pytest.raises(TypeError):
        files.write_atomically(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old\r\n", "a failed write leaves the old file"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"], "and no temporary file"


def _calls(path: Path) -> list[tuple[str, int]]:
    """Every attribute or function call in ``path`` that could write a file, with its line."""
    suspicious = {"write_text", "write_bytes", "savefig", "replace", "rename", "mkstemp", "fdopen"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in suspicious:
                found.append((name, node.lineno))
            if name == "open" and any(isinstance(a, ast.Constant) and "w" in str(a.value) for a in node.args[1:]):
                found.append((name, node.lineno))
    return found


def test_files_are_written_only_through_files_py() -> None:
    # backbone.py builds a pretrained model in a temporary folder and renames the folder: atomic as a whole.
    # plots.py saves figures into an in-memory buffer that files.write_atomically then writes.
    allowed = {"files.py": None, "backbone.py": None}
    offenders = {}
    for path in sorted((EXAMPLES / "madlab").glob("*.py")):
        if path.name in allowed:
            continue
        calls = [c for c in _calls(path) if not (path.name == "plots.py" and c[0] == "savefig")]
        calls = [c for c in calls if c[0] != "replace" or "os.replace" in path.read_text().splitlines()[c[1] - 1]]
        if calls:
            offenders[path.name] = calls
    assert offenders == {}


def test_inference_lives_beside_evaluation_not_in_training() -> None:
    training = (EXAMPLES / "madlab" / "run" / "training.py").read_text()
    assert "def predict" not in training
    assert app.predict.__module__ == "madlab.run.inference"
    assert os.path.exists(EXAMPLES / "madlab" / "run" / "inference.py")
