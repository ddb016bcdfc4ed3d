"""Every code block in README.md and docs/ runs or is checked, so the docs cannot drift from the code.

``>>>`` python blocks are doctests, run by pytest itself (``--doctest-glob=*.md``). This file
runs the other python blocks and checks bash blocks: commands exist, scripts and extras exist,
the example's arguments parse with its own parser, ``--override`` keys are real config
fields, and pinned versions match what is installed.
"""

from __future__ import annotations

import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
KNOWN_COMMANDS = {"python", "python3", "pip", "pytest", "ruff", "mypy"}


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for match in FENCE.finditer(path.read_text()):
            if match[1] == language:
                line = path.read_text()[: match.start()].count("\n") + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", match[2]))
    return found


def test_every_fence_names_a_language():
    unnamed = [(str(p.relative_to(ROOT)), m.start()) for p in DOCS for m in FENCE.finditer(p.read_text()) if not m[1]]
    assert not unnamed, f"code blocks without a language cannot be checked: {unnamed}"


def test_python_blocks_are_doctests_or_run():
    assert blocks("python"), "no python blocks found: the fence pattern is broken"


PLAIN_PYTHON = [b for b in blocks("python") if not b[1].lstrip().startswith(">>>")]


@pytest.mark.parametrize(("where", "code"), PLAIN_PYTHON or [
    pytest.param("none", "", marks=pytest.mark.skip(reason="every python block is a doctest"))])
def test_plain_python_block_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__doc_snippet__"})


def example_parser():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import morph_detection
        from madlab.io.config import Config, apply_overrides
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return morph_detection.parse_args, Config, apply_overrides


def optional_dependencies() -> set[str]:
    """Extra names in pyproject.toml (a regex, not tomllib, which Python 3.10 lacks)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))


def check_command(argv: list[str], where: str) -> None:
    program = argv[0]
    if program.startswith(".venv/bin/"):
        program = program.removeprefix(".venv/bin/")
    assert program in KNOWN_COMMANDS, f"{where}: unknown command {argv[0]!r}"
    args = argv[1:]
    if program.startswith("python") and args[:1] == ["-m"]:
        assert args[1] in {"venv", "pytest", "pip"}, f"{where}: unknown module {args[1]!r}"
    elif program.startswith("python") and args and args[0].endswith(".py"):
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {args[0]} does not exist"
        if script.name == "morph_detection.py":
            parse, config, apply_overrides = example_parser()
            parsed, _ = parse(args[1:])  # SystemExit on an unknown flag or command
            apply_overrides(config(), getattr(parsed, "override", []))  # ConfigError on an unknown key
    elif program == "pip" and args[:1] == ["install"]:
        extras = optional_dependencies()
        for arg in args[1:]:
            if arg.startswith(".["):
                wanted = arg[2:-1].split(",")
                assert set(wanted) <= set(extras), f"{where}: extras {wanted}, pyproject has {sorted(extras)}"
            pinned = re.fullmatch(r"([A-Za-z0-9_.-]+)==([\w.]+)", arg)
            if pinned:
                try:
                    installed = version(pinned[1]).split("+")[0]
                except PackageNotFoundError:
                    continue  # optional (timm): the pin is all we can check
                assert installed == pinned[2], f"{where}: pins {arg}, the test environment has {installed}"


@pytest.mark.parametrize(("where", "code"), blocks("bash"))
def test_bash_block_commands_exist(where, code):
    for line in code.strip().splitlines():
        for command in line.split("&&"):
            check_command(shlex.split(command), where)
