"""The single-adapter path of this checkout against another revision of ``lora_vit``, in one process.

On a shared machine the plain figures of two runs minutes apart differ by more than a change
could; this script times both libraries in the same interleaved rounds (old, new, old, new,
...), so load that drifts between rounds cancels in the per-round ratios. The old library is
``git archive <rev> lora_vit``, imported as ``lora_vit_old`` (the package uses only relative
imports of itself). Variants, each for both libraries on its own copy of the model:

- ``train_p0`` / ``train_p0.1``: a training step (forward, cross-entropy, backward) with LoRA
  dropout 0 / 0.1;
- ``infer``: unmerged inference (``torch.inference_mode``).

``new/old`` is the median over rounds of the new library's time over the old one's.

    python benchmarks/bench_ab.py --old c665f9c --reps 9
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import common
import torch
import torch.nn.functional as F

import lora_vit

ROOT = Path(__file__).resolve().parent.parent


def old_library(rev: str, where: Path):
    """``lora_vit`` as of ``rev``, importable as ``lora_vit_old``."""
    archive = where / "old.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "archive", rev, "lora_vit"], cwd=ROOT, stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    shutil.move(str(where / "lora_vit"), str(where / "lora_vit_old"))
    sys.path.insert(0, str(where))
    return importlib.import_module("lora_vit_old")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="HEAD~1", help="git revision of the old library")
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(common.NUM_LABELS, (args.batch,), generator=gen)
    base = common.build_vit(args.model, args.image_size)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        libraries = {"old": old_library(args.old, Path(folder)), "new": lora_vit}
        calls = {}
        for variant in ("train_p0", "train_p0.1", "infer"):
            for label, lib in libraries.items():
                dropout = 0.1 if variant == "train_p0.1" else 0.0
                model = lib.inject_lora(copy.deepcopy(base), common.QKV, r=common.RANK, alpha=common.ALPHA,
                                        dropout=dropout)
                if variant == "infer":
                    model.eval()

                    def call(model=model) -> None:
                        with torch.inference_mode():
                            model(pixel_values=pixels)
                else:
                    model.train()

                    def call(model=model) -> None:
                        F.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
                        model.zero_grad(set_to_none=True)

                call()  # warm-up
                calls[f"{variant} {label}"] = call
            print(f"  {variant}: ready", file=sys.stderr)
        timing = common.interleaved_medians(calls, args.reps, "cpu")
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, r={common.RANK} on q, k, v, {args.reps} rounds;"
          f" old = {args.old}; load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end;"
          f" {common.environment('cpu').get('cpu')}, {torch.get_num_threads()} threads")
    print(f"{'variant':12} {'old s':>8} {'new s':>8} {'new/old':>8}")
    for variant in ("train_p0", "train_p0.1", "infer"):
        old, new = timing[f"{variant} old"], timing[f"{variant} new"]
        print(f"{variant:12} {old['median_s']:8.3f} {new['median_s']:8.3f} {common.ratio(new, old):8.3f}")


if __name__ == "__main__":
    main()
