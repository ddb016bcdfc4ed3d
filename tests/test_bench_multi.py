"""benchmarks/bench_multi.py end to end on a tiny ViT: every row present, ratios taken in the same run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_every_row_with_its_ratios(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_multi.py"), "--models", "vit_micro", "--image-size", "32",
         "--reps", "1", "--batch", "4", "--train-batch", "2", "--adapters", "3", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("multi-*.json")
    rows = {r["variant"]: r for r in json.loads(result.read_text())["rows"]}
    expected = {"base", "one", "mixed", "train_one", "train_mixed", "one_head", "mixed_heads", "train_one_head",
                "train_mixed_heads"}
    expected |= {"peft_mixed"} if "peft_mixed" in rows else set()
    assert set(rows) == expected
    assert rows["mixed"]["x_one"] > 0 and rows["train_mixed"]["x_one"] > 0
    assert rows["mixed_heads"]["x_one"] > 0 and rows["train_mixed_heads"]["x_one"] > 0
    assert rows["train_mixed"]["batch"] == 2 and rows["mixed"]["batch"] == 4
    if "peft_mixed" in rows:
        assert rows["mixed"]["x_peft"] > 0 and rows["base"]["x_peft"] > 0
