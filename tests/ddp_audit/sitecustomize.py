"""Loaded by every process of tests/test_example_ddp.py's torchrun (via PYTHONPATH): records what each
rank writes under $MADLAB_AUDIT_WATCH into $MADLAB_AUDIT_DIR/rank<RANK>.txt, from Python's audit events."""

import atexit
import os
import sys

_WATCH = os.environ.get("MADLAB_AUDIT_WATCH")
_DIR = os.environ.get("MADLAB_AUDIT_DIR")
_RANK = os.environ.get("RANK")

if _WATCH and _DIR and _RANK is not None:
    _watch = os.path.realpath(_WATCH)
    _seen: list[str] = []
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _inside(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(_watch)
        except (TypeError, ValueError):
            return False

    def _hook(event: str, args: tuple) -> None:
        if event == "open" and args and _inside(args[0]):
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if writes:
                _seen.append(f"open {os.fsdecode(args[0])}")
        elif event == "os.rename" and len(args) > 1 and _inside(args[1]):  # os.replace too; record the target
            _seen.append(f"{event} {os.fsdecode(args[1])}")
        elif event in ("os.mkdir", "os.remove", "os.rmdir") and args and _inside(args[0]):
            _seen.append(f"{event} {os.fsdecode(args[0])}")

    def _dump() -> None:
        with open(os.path.join(_DIR, f"rank{_RANK}.txt"), "w") as handle:
            handle.write("\n".join(_seen))

    sys.addaudithook(_hook)
    atexit.register(_dump)
