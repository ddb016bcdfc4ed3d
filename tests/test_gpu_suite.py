"""benchmarks/gpu_suite.py: time boxes, variant discovery, and a CPU smoke run of its parts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_a_part_past_its_time_box_is_killed_and_keeps_what_it_printed(tmp_path):
    log = tmp_path / "slow.log"
    code = "import time; print('measured 1', flush=True); time.sleep(60)"
    outcome = gpu_suite.run_streaming([sys.executable, "-c", code], 3, "slow", log)
    assert outcome.status == "timeout" and outcome.returncode is None
    assert outcome.seconds < 30
    assert "measured 1" in outcome.output and "measured 1" in log.read_text()


def test_a_failing_part_is_recorded_with_its_return_code(tmp_path):
    outcome = gpu_suite.run_streaming([sys.executable, "-c", "raise SystemExit(3)"], 30, "bad", tmp_path / "bad.log")
    assert (outcome.status, outcome.returncode) == ("failed", 3)


def test_variants_a_benchmark_lacks_are_skipped_and_its_dora_variants_picked_up():
    offered = ["floor", "full", "lora_p0", "lora_p0.1", "dora_p0", "dora_p0.1", "peftdora_p0.1"]
    chosen, missing = gpu_suite.select_variants(offered, ["floor", "lora_p0.1", "peft_p0.1"])
    assert chosen == ["floor", "lora_p0.1", "dora_p0", "dora_p0.1", "peftdora_p0.1"]
    assert missing == ["peft_p0.1"]


def test_this_checkouts_benchmarks_offer_the_suites_core_variants():
    chosen, missing = gpu_suite.bench_variants("bench_train", gpu_suite.TRAIN_VARIANTS)
    assert {"floor", "full", "lora_p0", "lora_p0.1"} <= set(chosen)
    chosen, missing = gpu_suite.bench_variants("bench_infer", gpu_suite.INFER_VARIANTS)
    assert missing == []


def test_cuda_tests_part_collects_test_cuda_and_every_cuda_only_test_elsewhere():
    ids = gpu_suite.cuda_tests()
    assert ids[0] == "tests/test_cuda.py"
    for node in ids[1:]:
        path, name = node.split("::")
        source = (ROOT / path).read_text()
        assert f"def {name}(" in source
        head = source[: source.index(f"def {name}(")].rsplit("\n\n", 1)[-1]
        assert "torch.cuda.is_available()" in head  # its own decorators say it needs CUDA


def test_result_line_is_the_last_one_printed():
    out = "noise\nGPU-SUITE-RESULT {\"a\": 1}\nmore\nGPU-SUITE-RESULT {\"a\": 2}\ntrailer\n"
    assert gpu_suite.parse_result_line(out) == {"a": 2}
    assert gpu_suite.parse_result_line("nothing here") is None


@pytest.mark.slow
def test_smoke_run_writes_every_parts_json_and_a_summary(tmp_path):
    """The eager parts end to end on CPU (the compiled ones add minutes on 2 cores: run by hand)."""
    parts = ["env", "cuda_tests", "train_b_eager", "infer_b_eager", "example"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--reps", "1",
         "--output", str(tmp_path), "--parts", *parts],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {p: json.loads((tmp_path / f"{p}.json").read_text()) for p in parts}
    assert all(r["status"] in ("ok", "skipped") for r in records.values())
    assert records["env"]["figures"]["device"] == "cpu" and records["env"]["figures"]["cpu"]
    assert records["cuda_tests"]["figures"]["skipped"] >= 1  # no CUDA here: every test skips, none errors
    assert records["cuda_tests"]["figures"]["error"] == records["cuda_tests"]["figures"]["failed"] == 0
    (train,) = records["train_b_eager"]["figures"]["result_files"].values()
    rows = {r["variant"]: r for r in train["rows"]}
    assert {"floor", "lora_p0", "lora_p0.1"} <= set(rows)
    assert rows["floor"]["x_floor"] == 1.0 and rows["lora_p0.1"]["x_floor"] > 0
    assert rows["lora_p0.1"]["rounds"] == 1 and rows["lora_p0.1"]["device_model"]
    (infer,) = records["infer_b_eager"]["figures"]["result_files"].values()
    assert {r["variant"] for r in infer["rows"]} >= {"base", "lora_unmerged", "lora_merged"}
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {p} |" in summary for p in parts)
    assert "Training step" in summary and "Inference" in summary
