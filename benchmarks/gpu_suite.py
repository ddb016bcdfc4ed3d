"""Everything a short GPU lease should measure, in one command, within a time budget.

    python benchmarks/gpu_suite.py --output DIR           # CUDA machine, at most ~8 minutes
    python benchmarks/gpu_suite.py --smoke --output DIR   # the same code on CPU, tiny shapes

Parts, in order of value (a run cut short keeps every part that finished before the cut):

1. ``env``: device, driver, CUDA / torch / Triton / transformers / PEFT versions, CPU model.
2. ``cuda_tests``: ``pytest tests/test_cuda.py`` (bf16 layer, merge, inductor one-graph step)
   and every test elsewhere that is marked to skip without CUDA.
3. ``train_b_eager``: ``bench_train.py`` bf16 training step on ViT-B/16, eager: floor, full
   fine-tuning, lora_vit dropout 0 / 0.1, PEFT, and every DoRA variant bench_train offers.
   Images/s, ratio to the floor and to PEFT, CUDA peak memory of one step.
4. ``infer_b_eager``: ``bench_infer.py`` bf16 inference, base / unmerged / merged.
5. ``train_l_eager``: the training step on ViT-L/16, eager.
6. ``no_triton``: on CUDA with Triton made unimportable, what ``torch.compile`` does (a
   compiled step or a clear message, never a crash) and that the documented fallback
   (``backend="aot_eager"``, docs/compile.md) compiles one graph with eager's gradients.
7. ``train_b_compiled``: the ViT-B/16 step under ``torch.compile(fullgraph=True)``, floor,
   lora_vit and PEFT at dropout 0.1 (and DoRA at 0.1 where offered).
8. ``infer_b_compiled``: inference base / unmerged / merged, compiled.
9. ``example``: the example's training step (``benchmarks/bench_example.py``, if present)
   on a ViT-B-sized backbone, bf16 + compile; skipped with a message where the script is absent.
10. ``train_b_compiled_p0``: the compiled step at dropout 0 (floor, lora_vit, PEFT).
11. ``mha_b_eager``: ``bench_mha.py`` (LoRA inside ``nn.MultiheadAttention``, torchvision
    layout), training step and inference, eager, where this checkout has it.
12. ``multi_s``: ``bench_multi.py`` (8 named adapters on ViT-S/16, a mixed batch against one
    adapter and against PEFT's ``adapter_names=`` forward, and 8 adapters each with its own
    head mixed against one adapter with its head; inference and training, eager and
    compiled), where this checkout has it.

Each part runs in its own subprocess under its own time box (clipped to what is left of
``--budget``), streams its output prefixed with its name, and writes ``DIR/<part>.json``
(status, seconds, command, environment, figures) the moment it ends; benchmark parts also
leave their own result files in ``DIR/<part>/``. ``DIR/summary.md`` collects everything at
the end. A part that fails or times out is recorded as such and the suite moves on.

``--smoke`` runs every part on CPU with a two-block ViT at 32 px (``vit_micro``), batch 2,
two rounds: it checks the suite, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT_PREFIX = "GPU-SUITE-RESULT "

# What the training parts ask bench_train.py for; names it does not offer are skipped (and
# listed), and DoRA-like names it does offer (dora_*, peftdora_*) are added automatically.
TRAIN_VARIANTS = ["floor", "full", "lora_p0", "lora_p0.1", "peft_p0", "peft_p0.1"]
# Compiling a ViT-B training graph takes tens of seconds per variant: the dropout-0.1 rows
# come first; the dropout-0 rows are a later part, run if the budget still allows.
COMPILED_TRAIN_VARIANTS = ["floor", "lora_p0.1", "peft_p0.1"]
COMPILED_TRAIN_VARIANTS_P0 = ["floor", "lora_p0", "peft_p0"]
DORA_PREFIXES = ("dora", "peftdora")
INFER_VARIANTS = ["base", "lora_unmerged", "lora_merged", "peft_unmerged", "peft_merged"]
COMPILED_INFER_VARIANTS = ["base", "lora_unmerged", "lora_merged"]
L_VARIANTS = ("floor", "full", "lora_p0.1", "peft_p0.1")  # ViT-L: the headline rows only
SMOKE_TITLE = " (smoke run on CPU: checks the suite, not the figures)"


@dataclass
class Part:
    """One time-boxed subprocess of the suite."""

    name: str
    timeout_s: float
    what: str
    command: list[str] | None = None  # None: skipped, see ``skip_reason``
    skip_reason: str = ""
    results_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    status: str  # ok | failed | timeout | skipped
    returncode: int | None
    seconds: float
    output: str


def run_streaming(
    command: list[str], timeout: float, prefix: str, log: Path, env: dict[str, str] | None = None
) -> Outcome:
    """Run ``command``, echo its output line by line with ``prefix``, kill its group after ``timeout``.

    The output is also written to ``log`` as it arrives, so a part killed by its time box
    still leaves what it printed.
    """
    start = time.monotonic()
    lines: list[str] = []
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,  # its own group: a timeout kills its children too
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                sink.write(line)
                sink.flush()
                print(f"  {prefix} | {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode: int | None = proc.wait(timeout=timeout)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode, status = None, "timeout"
        reader.join(timeout=5)
    return Outcome(status, returncode, time.monotonic() - start, "".join(lines))


def parse_result_line(output: str) -> dict[str, Any] | None:
    """The JSON a part printed after :data:`RESULT_PREFIX`, if any (the last one wins)."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def select_variants(offered: list[str], names: list[str]) -> tuple[list[str], list[str]]:
    """(the ``names`` a benchmark offers plus every DoRA variant it offers, in its order; ``names`` it lacks)."""
    wanted = list(names) + [v for v in offered if v.startswith(DORA_PREFIXES) and v not in names]
    return [v for v in offered if v in wanted], [v for v in names if v not in offered]


def bench_variants(script: str, names: list[str]) -> tuple[list[str], list[str]]:
    """:func:`select_variants` over the variants a benchmark script offers.

    Read from the script's module constants without running it, so a variant another
    branch adds (``dora_p0.1``) is picked up, and one it does not have is skipped, not fatal.
    """
    sys.path.insert(0, str(HERE))
    try:
        module = __import__(script)
    finally:
        sys.path.remove(str(HERE))
    return select_variants(list(getattr(module, "BASE_VARIANTS", None) or module.VARIANTS), names)


def compiled_offered(names: list[str], dropout: str) -> list[str]:
    """The ``names`` bench_train compiles, plus its compiled DoRA variants of this dropout."""
    import bench_train

    extra = [v for v in bench_train.COMPILED_VARIANTS if v.startswith(DORA_PREFIXES) and v.endswith("_p" + dropout)]
    return [v for v in bench_train.COMPILED_VARIANTS if v in names or v in extra]


def help_of(script: Path) -> str:
    """A script's ``--help`` text (empty if it cannot even print it)."""
    try:
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout


_CUDA_ONLY = re.compile(r"@pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)[^\n]*\n(?:@[^\n]*\n)*def (test_\w+)")


_CUDA_ONLY_MODULE = re.compile(r"^pytestmark = pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)", re.M)


def cuda_tests() -> list[str]:
    """``tests/test_cuda.py`` plus every test elsewhere marked to skip without CUDA (node ids).

    A file marked as a whole (``pytestmark = ...skipif(not torch.cuda.is_available() ...``)
    is taken whole; elsewhere, each test function so decorated.
    """
    ids = ["tests/test_cuda.py"]
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == "test_cuda.py":
            continue
        source = path.read_text()
        if _CUDA_ONLY_MODULE.search(source):
            ids.append(f"tests/{path.name}")
        else:
            ids += [f"tests/{path.name}::{name}" for name in _CUDA_ONLY.findall(source)]
    return ids


def plan(args: argparse.Namespace, out: Path) -> list[Part]:
    """The parts of this run, with their commands and time boxes."""
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    b_model, l_model = ("vit_micro", "vit_micro") if smoke else ("vit_b16", "vit_l16")
    image = "32" if smoke else "224"
    batch_b, batch_l = (2, 2) if smoke else (args.batch_b, args.batch_l)
    reps = str(args.reps or (2 if smoke else 10))
    py = sys.executable
    common_flags = ["--device", device, "--dtype", "fp32" if smoke else "bf16", "--image-size", image, "--reps", reps]
    if args.note:
        common_flags += ["--note", args.note]
    train_names, train_missing = bench_variants("bench_train", TRAIN_VARIANTS)
    infer_names, infer_missing = bench_variants("bench_infer", INFER_VARIANTS)
    box = (lambda s: s * 4) if smoke else (lambda s: s)  # 2 slow CPU cores compile slower than a GPU host

    def bench(name: str, script: str, model: str, batch: int, variants: list[str], missing: list[str],
              timeout: float, what: str, *flags: str) -> Part:
        results = out / name
        command = [py, str(HERE / script), "--models", model, "--batch", str(batch), *common_flags,
                   "--variants", *variants, "--results-dir", str(results), *flags]
        return Part(name, box(timeout), what, command, results_dir=results, extra={"variants_not_offered": missing})

    parts = [
        Part("env", 60, "device and versions", [py, str(HERE / "gpu_suite.py"), "--run-part", "env"]),
        Part("cuda_tests", box(200), "pytest tests/test_cuda.py and the CUDA-only tests elsewhere",
             [py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *cuda_tests(),
              f"--junitxml={out / 'cuda_tests.xml'}"]),
        bench("train_b_eager", "bench_train.py", b_model, batch_b, train_names, train_missing, 120,
              f"training step, {b_model}, eager", "--no-memory"),
        bench("infer_b_eager", "bench_infer.py", b_model, batch_b, infer_names, infer_missing, 60,
              f"inference, {b_model}, eager"),
        bench("train_l_eager", "bench_train.py", l_model, batch_l,
              [v for v in train_names if v in L_VARIANTS or (v.startswith(DORA_PREFIXES) and v.endswith("_p0.1"))],
              train_missing, 120,
              f"training step, {l_model}, eager", "--no-memory"),
        Part("no_triton", box(90), "torch.compile on the device with Triton unimportable",
             [py, str(HERE / "gpu_suite.py"), "--run-part", "no_triton", "--device", device]),
        bench("train_b_compiled", "bench_train.py", b_model, batch_b, compiled_offered(COMPILED_TRAIN_VARIANTS, "0.1"),
              [], 240, f"training step, {b_model}, torch.compile, dropout 0.1", "--no-memory", "--compile-only"),
        bench("infer_b_compiled", "bench_infer.py", b_model, batch_b, COMPILED_INFER_VARIANTS, [], 90,
              f"inference, {b_model}, torch.compile", "--compile-only"),
    ]
    example = HERE / "bench_example.py"
    if example.exists():
        # Only flags whose meaning is clear from their name; the image size stays the
        # script's own (its backbone's) except in a smoke run.
        help_text = help_of(example)
        flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
        bf16 = ["eager_bf16", "compiled_bf16"] if not smoke else ["eager_fp32", "compiled_fp32"]
        e_model = b_model if b_model in help_text else "vit_ti16"  # a script that predates vit_micro
        wanted = {"--device": [device], "--dtype": ["fp32" if smoke else "bf16"], "--compile": [],
                  "--results-dir": [str(out / "example")], "--smoke": [] if smoke else None,
                  "--backbone-size": [e_model], "--model": [e_model], "--models": [e_model],
                  "--image-size": [image] if smoke else None, "--batch": [str(2 if smoke else args.batch_example)],
                  "--reps": [reps],
                  # bench_example.py names its rows eager_/compiled_ x fp32/bf16: ask for bf16 both ways
                  "--variants": bf16 if all(v in help_text for v in bf16) else None}
        command = [py, str(example)]
        for flag, value in wanted.items():
            if flag in flags and value is not None:
                command += [flag, *value]
        parts.append(Part("example", box(120), "the example's training step, bf16 + compile", command,
                          results_dir=out / "example", extra={"flags_used": command[2:]}))
    else:
        parts.append(Part("example", 0, "the example's training step", None,
                          skip_reason="benchmarks/bench_example.py is not in this checkout (it comes with the"
                                      " backbones work); nothing to run"))
    parts.append(bench("train_b_compiled_p0", "bench_train.py", b_model, batch_b,
                       compiled_offered(COMPILED_TRAIN_VARIANTS_P0, "0"), [], 150,
                       f"training step, {b_model}, torch.compile, dropout 0", "--no-memory", "--compile-only"))
    mha = HERE / "bench_mha.py"
    if mha.exists():
        results = out / "mha_b_eager"
        parts.append(Part("mha_b_eager", box(90), f"LoRA in nn.MultiheadAttention (torchvision), {b_model}, eager",
                          [py, str(mha), "--models", b_model, "--batch", str(batch_b), *common_flags,
                           "--mode", "both", "--results-dir", str(results)], results_dir=results))
    multi = HERE / "bench_multi.py"
    if multi.exists():
        results = out / "multi_s"
        s_model = "vit_micro" if smoke else "vit_s16"
        parts.append(Part("multi_s", box(300), f"8 named adapters (and 8 heads), mixed batch vs one adapter and PEFT,"
                          f" {s_model}",
                          [py, str(multi), "--models", s_model, *common_flags, "--compile",
                           "--batch", str(4 if smoke else 128), "--train-batch", str(2 if smoke else 64),
                           "--results-dir", str(results)], results_dir=results))
    chosen = set(args.parts or [p.name for p in parts])
    return [p for p in parts if p.name in chosen]


def figures_of(part: Part, outcome: Outcome, out: Path) -> dict[str, Any]:
    """What a finished part measured, read from what it left behind."""
    if part.name == "cuda_tests":
        return junit_counts(out / "cuda_tests.xml", outcome.output)
    if part.results_dir is not None:
        _collect_printed_results(outcome.output, part.results_dir)
        found = {}
        for path in sorted(part.results_dir.glob("*.json")):
            with open(path) as f:
                found[path.name] = json.load(f)
        return {"result_files": found} if found else {}
    return parse_result_line(outcome.output) or {}


def _collect_printed_results(output: str, results_dir: Path) -> None:
    """Copy the result files a benchmark printed (``results: PATH``) into ``results_dir``.

    For a script that does not know ``--results-dir`` and wrote under its own default.
    """
    for match in re.finditer(r"^results: (\S+\.json)\s*$", output, re.M):
        path = Path(match[1])
        if path.exists() and path.parent.resolve() != results_dir.resolve():
            results_dir.mkdir(parents=True, exist_ok=True)
            for twin in (path, path.with_suffix(".md")):
                if twin.exists():
                    shutil.copy2(twin, results_dir / twin.name)


def junit_counts(xml: Path, output: str) -> dict[str, Any]:
    if not xml.exists():
        return {"summary": (output.strip().splitlines() or ["no output"])[-1]}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    tests = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or "")[:300]
                tests.append({"test": case.get("name"), "outcome": outcome, "message": message})
                break
        else:
            tests.append({"test": case.get("name"), "outcome": outcome})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": tests}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def run_suite(args: argparse.Namespace) -> int:
    out = args.output or HERE / "results" / ("gpu-suite-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                                              + ("-smoke" if args.smoke else ""))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device here; `--smoke` runs the same parts on CPU with tiny shapes",
                  file=sys.stderr)
            return 2
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    start = time.monotonic()
    deadline = start + args.budget
    parts = plan(args, out)
    print(f"gpu_suite: {len(parts)} parts, budget {args.budget:.0f} s, results in {out}", flush=True)
    env_info: dict[str, Any] = {}
    records = []
    for part in parts:
        left = deadline - time.monotonic()
        record: dict[str, Any] = {"part": part.name, "what": part.what, "suite_command": command,
                                  "smoke": args.smoke, **part.extra}
        if part.command is None or left < args.min_part_s:
            reason = part.skip_reason or f"budget spent ({left:.0f} s left of {args.budget:.0f} s)"
            print(f"[{time.monotonic() - start:5.0f}s] {part.name}: skipped: {reason}", flush=True)
            record.update(status="skipped", message=reason, seconds=0.0, environment=env_info)
        else:
            timeout = min(part.timeout_s, left)
            print(f"[{time.monotonic() - start:5.0f}s] {part.name}: {part.what} (time box {timeout:.0f} s)", flush=True)
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            sub_env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
            outcome = run_streaming(part.command, timeout, part.name, out / f"{part.name}.log", sub_env)
            figures = figures_of(part, outcome, out)
            if part.name == "env":
                env_info = figures
            record.update(status=outcome.status, returncode=outcome.returncode, seconds=round(outcome.seconds, 1),
                          time_box_s=round(timeout), command=shlex.join(part.command), environment=env_info,
                          figures=figures, log=f"{part.name}.log")
            if outcome.status != "ok":
                record["output_tail"] = outcome.output[-3000:]
            print(f"[{time.monotonic() - start:5.0f}s] {part.name}: {outcome.status} in {outcome.seconds:.0f} s",
                  flush=True)
        write_json(out / f"{part.name}.json", record)
        records.append(record)
    summary = out / "summary.md"
    summary.write_text(render_summary(records, command, env_info, time.monotonic() - start, out))
    print(f"gpu_suite: done in {time.monotonic() - start:.0f} s; summary: {summary}", flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


def render_summary(
    records: list[dict[str, Any]], command: str, env: dict[str, Any], seconds: float, out: Path
) -> str:
    lines = [
        "# GPU suite" + (SMOKE_TITLE if records and records[0]["smoke"] else ""),
        "",
        f"- command: `{command}`",
        f"- device: {env.get('device_name', '?')}; CPU {env.get('cpu', '?')}; torch {env.get('torch', '?')}"
        f" (CUDA {env.get('cuda') or '-'}), Triton {env.get('triton') or 'absent'}, transformers"
        f" {env.get('transformers', '?')}, PEFT {env.get('peft') or 'absent'}",
        f"- wall time: {seconds:.0f} s",
        "",
        "| part | what | status | seconds |",
        "|---|---|---|---:|",
    ]
    for r in records:
        status = r["status"] + (f": {r['message']}" if r.get("message") else "")
        lines.append(f"| {r['part']} | {r['what']} | {status} | {r.get('seconds', 0):.0f} |")
    lines.append("")
    for r in records:
        figures = r.get("figures") or {}
        if r["part"] == "cuda_tests" and "tests" in figures:
            lines += ["## tests/test_cuda.py", "",
                      ", ".join(f"{figures[k]} {k}" for k in ("passed", "failed", "error", "skipped")), ""]
            lines += [f"- {t['test']}: {t['outcome']}" + (f" ({t['message']})" if t.get("message") else "")
                      for t in figures["tests"]]
            lines.append("")
        elif r["part"] == "no_triton" and figures:
            lines += ["## Without Triton", "", f"- verdict: {figures.get('verdict')}"]
            lines += [f"- {k}: {v}" for k, v in figures.items() if k not in ("verdict", "environment")]
            lines.append("")
        elif r.get("status") != "skipped" and (out / r["part"]).is_dir():
            for md in sorted((out / r["part"]).glob("*.md")):
                body = md.read_text().split("\n", 1)[1] if "\n" in md.read_text() else ""
                lines += [f"## {r['part']} ({md.name})", body.strip(), ""]
        if r.get("variants_not_offered"):
            lines += [f"{r['part']}: variants this checkout's benchmark lacks: {r['variants_not_offered']}", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parts run in-process


def part_env() -> dict[str, Any]:
    import platform

    import common
    import torch

    import lora_vit

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu": common.cpu_model(),
                            "cpu_count": os.cpu_count(), "lora_vit": lora_vit.__version__}
    for name in ("transformers", "peft", "triton", "timm"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    device_count=torch.cuda.device_count())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    else:
        info.update(device="cpu", device_name=common.cpu_model())
    return info


def part_no_triton(device: str) -> dict[str, Any]:
    """Triton made unimportable before torch loads; then compile a LoRA training step three ways."""
    sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` now raises ImportError
    import common
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    import lora_vit

    findings: dict[str, Any] = {"device": device, "triton_importable": False}
    image = 32

    def model_and_batch():
        model = common.build_vit("vit_micro", image)
        lora_vit.inject_lora(model, ("q", "k", "v"), r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(4, 3, image, image, generator=gen).to(device)
        return model.to(device).train(), pixels

    def grads_of(model, run, pixels):
        model.zero_grad(set_to_none=True)
        with common.autocast(device, "bf16" if device == "cuda" else "fp32"):
            loss = run(pixel_values=pixels).logits.float().square().mean()
        loss.backward()
        return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}

    def attempt(label: str, backend: str | None) -> None:
        torch._dynamo.reset()
        model, pixels = model_and_batch()
        eager = grads_of(model, model, pixels)
        counter = CompileCounterWithBackend(backend or "inductor")
        try:
            compiled = torch.compile(model, fullgraph=True, backend=counter)
            got = grads_of(model, compiled, pixels)
            worst = max(((got[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in eager.items())
            findings[label] = {"outcome": "compiled", "graphs": counter.frame_count, "worst_rel_grad_diff": worst}
        except Exception as exc:  # the finding is what was raised, and whether it says why
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            findings[label] = {"outcome": "error", "type": type(exc).__name__, "message": message,
                               "names_triton": "triton" in str(exc).lower()}

    attempt("inductor", None)
    attempt("aot_eager", "aot_eager")  # the fallback docs/compile.md documents
    if device == "cuda":
        attempt("cudagraphs", "cudagraphs")  # CUDA graphs over an aot-eager graph
    inductor, fallback = findings["inductor"], findings["aot_eager"]
    fallback_ok = (fallback["outcome"] == "compiled" and fallback["graphs"] == 1
                   and fallback["worst_rel_grad_diff"] < 5e-2)
    if inductor["outcome"] == "compiled":
        verdict = "ok: inductor compiled without Triton" + ("" if device == "cuda" else " (CPU: C++ kernels)")
    elif inductor["names_triton"]:
        verdict = "ok: inductor refused with a message naming Triton"
    else:
        verdict = "PROBLEM: inductor failed without naming Triton"
    verdict += "; aot_eager fallback " + ("compiles one graph matching eager" if fallback_ok else "FAILED")
    findings["verdict"] = verdict
    return findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="results folder (default benchmarks/results/gpu-suite-<UTC time>)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the suite runs")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all parts together (default 470)")
    parser.add_argument("--min-part-s", type=float, default=20, help="do not start a part with less than this left")
    parser.add_argument("--batch-b", type=int, default=256, help="batch of the ViT-B/16 parts (default 256)")
    parser.add_argument("--batch-l", type=int, default=128, help="batch of the ViT-L/16 part (default 128)")
    parser.add_argument("--batch-example", type=int, default=128, help="batch of the example part (default 128)")
    parser.add_argument("--reps", type=int, help="interleaved rounds per benchmark (default 10; smoke 2)")
    parser.add_argument("--parts", nargs="+", help="run only these parts (names as in the list above)")
    parser.add_argument("--note", default="", help="free text stored with every benchmark's results")
    parser.add_argument("--run-part", choices=["env", "no_triton"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_part == "env":
        print(RESULT_PREFIX + json.dumps(part_env()), flush=True)
        return 0
    if args.run_part == "no_triton":
        print(RESULT_PREFIX + json.dumps(part_no_triton(args.device)), flush=True)
        return 0
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
