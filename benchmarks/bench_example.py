"""The morph-detection example's training throughput (images/s): eager vs compiled, fp32 vs bf16.

One training step is exactly the example's: a batch from its ``ImageDataset`` (uint8 cache,
normalisation, flips and shifts) through ``make_loader``, the ``MorphDetector`` forward under
``speed.autocast``, class-weighted BCE, backward, and AdamW over what ``apply_strategy``
leaves trainable (LoRA by default: the example's q, k, v adapters r=4 and the head). The
backbone is an HF ``ViTModel`` of the named size built from a config (random weights,
nothing downloaded). Variants are timed in interleaved rounds after two warm-up steps
(which compile the compiled rows); the figure is the median over rounds.

    python benchmarks/bench_example.py                                  # ViT-B/16, 224 px, CPU
    python benchmarks/bench_example.py --device cuda --batch 64         # the same on a GPU
    python benchmarks/bench_example.py --models vit_ti16 --image-size 32 --reps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from madlab.config import Config, apply_overrides
from madlab.data import Sample
from madlab.families import BackboneSpec
from madlab.images import ImageDataset, make_loader
from madlab.model import MorphDetector, apply_strategy
from madlab.speed import autocast, compiled
from madlab.training import class_weights

VARIANTS = ["eager_fp32", "eager_bf16", "compiled_fp32", "compiled_bf16"]


def build_detector(name: str, image_size: int, config: Config) -> MorphDetector:
    """The example's detector on a random ViT of the named size (``benchmarks.common.MODELS``)."""
    from transformers import ViTConfig, ViTModel

    hidden, layers, heads, mlp = common.MODELS[name]
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=mlp, image_size=image_size, patch_size=16), add_pooling_layer=False)
    spec = BackboneSpec("vit", f"random {name}", None, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "cls", hidden)
    return MorphDetector(vit, spec, config.dropout_p)


def synthetic_dataset(n: int, size: int) -> ImageDataset:
    """``n`` random RGB images (half labelled morph), decoded into the example's uint8 cache."""
    rng = np.random.default_rng(0)
    samples = [Sample(f"synthetic/{i}", i % 2, "bona_fide" if i % 2 == 0 else "blend", "train",
                      image=rng.random((size, size, 3), dtype=np.float32)) for i in range(n)]
    return ImageDataset(samples, size, augment=True)


def make_step(variant: str, args: argparse.Namespace, config: Config) -> Callable[[], None]:
    device = torch.device(args.device)
    mode, precision = variant.split("_")
    model = build_detector(args.model, args.image_size, config).to(device)
    params, _ = apply_strategy(model, config)
    model.train()
    net = compiled(model, mode == "compiled")
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    dataset = synthetic_dataset(max(2 * args.batch, 16), args.image_size)
    weights = class_weights(np.array([s.label for s in dataset.samples]), None).to(device)
    batches = itertools.cycle(make_loader(dataset, args.batch, 0, shuffle=True, drop_last=True,
                                          generator=torch.Generator().manual_seed(0)))

    def step() -> None:
        x, y, _ = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = net(x)
        per_sample = nn.functional.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
        loss = (per_sample * weights[y.long()]).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


COLUMNS = [
    ("model", "model", "s"),
    ("variant", "variant", "s"),
    ("median_s", "median s", ".3f"),
    ("min_s", "min s", ".3f"),
    ("images_per_s", "img/s", ".1f"),
    ("x_eager_fp32", "speed-up vs eager fp32", ".2f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, reps=5)
    parser.set_defaults(models=["vit_b16"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="example config override, e.g. lora_target_modules=q,v (default: the example's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(Config(), args.override)
    env = common.environment(args.device)
    rows = []
    for name in args.models:
        args.model = name
        steps = {}
        for variant in args.variants:
            steps[variant] = make_step(variant, args, config)
            steps[variant]()  # warm-up; compiles the compiled rows
            steps[variant]()
            print(f"  {name} {variant}: ready", file=sys.stderr)
        timing = common.interleaved_medians(steps, args.reps, args.device)
        base = timing.get("eager_fp32", {}).get("median_s")
        for variant in args.variants:
            row = {"model": name, "variant": variant, **timing[variant]}
            row["images_per_s"] = args.batch / row["median_s"]
            row["x_eager_fp32"] = base / row["median_s"] if base else None
            rows.append(row)
    table = common.Table(COLUMNS, rows)
    print(table.text())
    title = (f"Example training step (LoRA {config.lora_target_modules} r={config.lora_r} + head), batch {args.batch},"
             f" {args.image_size} px, {args.device}, median of {args.reps} interleaved rounds")
    path = common.write_results("example", {"environment": env, "args": vars(args), "note": args.note, "rows": rows},
                                {title: table}, args.results_dir)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
