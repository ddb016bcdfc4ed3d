"""Shared helpers of the benchmarks: models from a config, timing, memory probes, results.

Conventions (see benchmarks/README.md):

- Models are HF transformers ``ViTForImageClassification`` built from a config, randomly
  initialised, so nothing is downloaded (``HF_HUB_OFFLINE=1`` is set here).
- Times are medians of interleaved repetitions: every variant runs once per round, rounds
  repeat ``--reps`` times, so drift in machine load hits all variants alike.
- Memory is measured in a fresh subprocess per variant (this module's ``--probe`` entry).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (hidden, layers, heads, mlp); patch 16, as in the ViT paper. vit_micro is no real
# model: two small blocks, for smoke runs of the scripts (gpu_suite.py --smoke).
MODELS = {
    "vit_micro": (64, 2, 2, 128),
    "vit_ti16": (192, 12, 3, 768),
    "vit_s16": (384, 12, 6, 1536),
    "vit_b16": (768, 12, 12, 3072),
    "vit_l16": (1024, 24, 16, 4096),
}
QKV = ("q_proj", "k_proj", "v_proj")  # HF transformers 5.x ViT names of q, k, v
RANK, ALPHA, NUM_LABELS = 8, 16, 10


def add_common_arguments(parser: argparse.ArgumentParser, reps: int) -> None:
    """The options both benchmarks take: models, batch, image size, rounds, device, dtype, compile, note."""
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"], choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=reps, help="interleaved rounds (median of these)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="add torch.compile(fullgraph=True) rows")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine loaded')")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and .md go")
    parser.add_argument("--compile-only", action="store_true", help="only the compiled (+c) rows (implies --compile)")


def build_vit(name: str, image_size: int, seed: int = 0) -> nn.Module:
    """A randomly initialised ``ViTForImageClassification`` of the named size."""
    from transformers import ViTConfig, ViTForImageClassification

    hidden, layers, heads, mlp = MODELS[name]
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image_size,
        patch_size=16,
        num_labels=NUM_LABELS,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights stay fp32), or nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype_of(dtype))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    steps: dict[str, Callable[[], None]], reps: int, device: str
) -> dict[str, dict[str, float]]:
    """Median / min seconds per call of each step, timed in rounds A, B, C, A, B, C, ..."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "reps": len(t), "times_s": t}
        for name, t in times.items()
    }


def ratio(row: dict[str, Any], ref: dict[str, Any]) -> float:
    """Median over rounds of ``row``'s time / ``ref``'s time in the same round.

    Both ran in the same round, seconds apart, so load that drifts between rounds cancels in
    each ratio; a median of medians would not cancel it. Rows without per-round times
    (older results) fall back to the ratio of medians.
    """
    a, b = row.get("times_s"), ref.get("times_s")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return row["median_s"] / ref["median_s"]


class SavedTensors:
    """Bytes of distinct storages saved for backward while active, parameters excluded.

    This is the activation memory a training step keeps between forward and backward,
    independent of device and allocator. A tensor saved by several ops (x shared by q, k
    and v) counts once; views count as their storage.
    """

    def __init__(self, model: nn.Module) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        self.storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
    except OSError:
        return False
    return True


def measure_step_memory(model: nn.Module, step: Callable[[], None], forward: Callable[[], Any], device: str) -> dict:
    """Memory of one training step, after a warm-up step (compiles, optimizer state).

    Returns saved activation bytes, the step's peak resident set growth (CPU; allocations
    are mmapped by the probe's ``MALLOC_MMAP_THRESHOLD_`` so freed memory goes back to the
    OS) and, on CUDA, ``max_memory_allocated`` above what was allocated before the step.
    """
    step()
    step()
    gc.collect()
    saved = SavedTensors(model)
    with saved.watch():
        out = forward()
    del out
    gc.collect()
    result: dict[str, Any] = {"saved_bytes": saved.nbytes}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    if _reset_peak_rss():
        base = _rss_bytes("VmRSS")
        step()
        result["rss_peak_bytes"] = _rss_bytes("VmHWM") - base
    else:
        result["rss_peak_bytes"] = None
    result["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def cuda_step_peak(step: Callable[[], None]) -> int:
    """``torch.cuda.max_memory_allocated()`` during one ``step()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def probe_in_subprocess(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --probe ...`` in a fresh interpreter and parse its JSON line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (from ``/proc/cpuinfo``), or ``"?"``."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return platform.processor() or "?"


def environment(device: str) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(ImportError):
        import peft

        info["peft"] = peft.__version__
    import lora_vit

    info["lora_vit"] = lora_vit.__version__
    info["cpu"] = cpu_model()  # recorded on GPU runs too: CPU figures depend on it, GPU ones on the host less
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class Table:
    """Rows of dicts rendered as a fixed-width text table and as markdown."""

    columns: list[tuple[str, str, str]]  # (key, header, format)
    rows: list[dict[str, Any]]

    def _cells(self, row: dict[str, Any]) -> list[str]:
        cells = []
        for key, _, fmt in self.columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        return cells

    def text(self) -> str:
        grid = [[h for _, h, _ in self.columns]] + [self._cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in grid) for i in range(len(self.columns))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                 for line in grid]
        return "\n".join(lines)

    def markdown(self) -> str:
        head = "| " + " | ".join(h for _, h, _ in self.columns) + " |"
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"
        body = ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        return "\n".join([head, rule, *body])


def write_results(
    kind: str, payload: dict[str, Any], tables: dict[str, Table], directory: Path = RESULTS
) -> Path:
    """Write ``<directory>/<kind>-<UTC time>.json`` and a ``.md`` twin; return the JSON path.

    Every row is stamped with the device it ran on (the CPU model for CPU rows) and the
    number of interleaved rounds behind its median, so a figure copied elsewhere keeps both.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), **payload}
    env = payload["environment"]
    env["loadavg_end"] = os.getloadavg()
    where = env.get("gpu") if env["device"] == "cuda" else env.get("cpu")
    rounds = payload.get("args", {}).get("reps")
    for row in payload.get("rows", []):
        row.setdefault("device_model", where)
        row.setdefault("rounds", rounds)
    path = directory / f"{kind}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = [
        f"# {kind} benchmark, {stamp}",
        "",
        f"- command: `{payload['command']}`",
        f"- device: {env['device']} ({where}; CPU {env.get('cpu')}), {env['cpu_count']} CPUs,"
        f" torch {env['torch']} ({env['torch_threads']} threads), transformers {env.get('transformers')},"
        f" peft {env.get('peft', 'not installed')}, lora_vit {env['lora_vit']}",
        f"- interleaved rounds per figure: {rounds} (each figure is the median over them)",
        f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
        "",
    ]
    for title, table in tables.items():
        md += [f"## {title}", "", table.markdown(), ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return path
