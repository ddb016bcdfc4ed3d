"""Running the morph-detection example's command line inside a test process."""

from __future__ import annotations

import contextlib
import io

import morph_detection


def cli(*args: str) -> tuple[int, str, str]:
    """The example's ``main(args)``: ``(exit code, stdout, stderr)``; a traceback fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = morph_detection.main(list(args))
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
    assert "Traceback" not in err.getvalue() + out.getvalue()
    return rc, out.getvalue(), err.getvalue()


def overrides(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--override", "a=1", "--override", "b=2"]``."""
    return [arg for item in items for arg in ("--override", item)]
