"""Whole-model check of the layer formulations of ``explore_layer.py`` (issue 5).

Patches ``lora_vit.LoRALinear.forward`` with a candidate from ``explore_layer`` and times
training steps of ViT-S/16 (or ``--model``) against the frozen floor and the library's
current forward, interleaved, in one process; also reports saved activation memory.

    python benchmarks/explore_model.py --model vit_s16 --dropout 0.1 --reps 5
"""

from __future__ import annotations

import argparse
import statistics

import bench_train
import common
import explore_layer as E
import torch

import lora_vit

CURRENT = lora_vit.LoRALinear.forward


def fused_forward(self, x):
    """Candidate: the whole layer as one autograd node (``explore_layer.LoRAFused``)."""
    p = self.dropout if self.training else 0.0
    return E.LoRAFused.apply(x, self.weight, self.bias, self.stacked_a(), self.scaled_b(), p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    ns = bench_train.parse_args(["--batch", "8"])
    ns.model = args.model
    forwards = {"current": CURRENT, "fused": fused_forward}
    steps, models = {}, {}
    steps_floor = bench_train.make_step("floor", ns, args.compile)
    models["floor"], steps["floor"], fwd_floor = steps_floor
    fwds = {"floor": fwd_floor}
    for name, fwd in forwards.items():
        lora_vit.LoRALinear.forward = fwd
        models[name], steps[name], fwds[name] = bench_train.make_step(f"lora_p{args.dropout}", ns, args.compile)
        for _ in range(2):
            steps[name]()
    lora_vit.LoRALinear.forward = CURRENT
    steps["floor"]()
    times = {k: [] for k in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            lora_vit.LoRALinear.forward = forwards.get(name, CURRENT)
            t = common.time.perf_counter()
            step()
            times[name].append(common.time.perf_counter() - t)
    base = statistics.median(times["floor"])
    base_min = min(times["floor"])
    saved = {}
    for name in steps:
        lora_vit.LoRALinear.forward = forwards.get(name, CURRENT)
        probe = common.SavedTensors(models[name])
        with probe.watch():
            out = fwds[name]()
        del out
        saved[name] = probe.nbytes
    print(f"{args.model} dropout={args.dropout} compile={args.compile} reps={args.reps} torch {torch.__version__}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:8} median {med:.3f}s x floor {med / base:.3f} (min-based {min(t) / base_min:.3f})"
              f"  saved {saved[name] / 2**20:7.1f} MiB x floor {saved[name] / saved['floor']:.3f}")


if __name__ == "__main__":
    main()
