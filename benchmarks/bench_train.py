"""Training-step benchmark: LoRA (lora_vit, PEFT) against the frozen floor, ViT-S/B at 224 px.

Variants (each a fresh HF ``ViTForImageClassification`` from a config, same seed):

- ``floor``: everything frozen, ``pixel_values.requires_grad_()``, so the activation
  gradient flows back through every block: what any LoRA step must at least do.
- ``head``: only the classifier trains (gradients stop at the head).
- ``full``: every parameter trains.
- ``lora_p0`` / ``lora_p0.1``: ``lora_vit.inject_lora`` r=8, alpha=16 on q, k, v, dropout 0 / 0.1.
- ``peft_p0`` / ``peft_p0.1``: the same adapters through PEFT (rows skipped if PEFT is absent).
- ``dora_p0`` / ``dora_p0.1``: ``inject_lora(..., use_dora=True)``, otherwise as ``lora_*``.
- ``peftdora_p0`` / ``peftdora_p0.1``: PEFT's DoRA (``LoraConfig(use_dora=True)``).

DoRA rows carry ``x LoRA`` (time and saved activations over lora_vit's LoRA row of the same
dropout and mode) and ``x PEFT`` (over PEFT's DoRA row).

With ``--compile``, floor, LoRA and PEFT are also timed under ``torch.compile(fullgraph=True)``
(the ``+c`` rows; their ratios are to the compiled floor). A step is forward, cross-entropy,
backward and an AdamW step over the trainable parameters (none for the floor).

    python benchmarks/bench_train.py                       # ViT-S/16 and ViT-B/16, CPU, eager
    python benchmarks/bench_train.py --models vit_s16 --compile --reps 5
    python benchmarks/bench_train.py --variants lora_p0 dora_p0 peftdora_p0 --compile   # DoRA goals
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path

import common
import torch
from torch import nn

import lora_vit

BASE_VARIANTS = [
    "floor", "head", "full", "lora_p0", "lora_p0.1", "peft_p0", "peft_p0.1",
    "dora_p0", "dora_p0.1", "peftdora_p0", "peftdora_p0.1",
]
# PEFT's DoRA does not compile with fullgraph=True (peft 0.21: dynamo breaks on its
# dequantize_module_weight type check), so it has no +c rows.
COMPILED_VARIANTS = ["floor", "lora_p0", "lora_p0.1", "peft_p0", "peft_p0.1", "dora_p0", "dora_p0.1"]
_PEFT_KINDS = ("peft", "peftdora")


def make_model(variant: str, model_name: str, image_size: int) -> nn.Module:
    """The model of one variant with its trainable parameters set."""
    model = common.build_vit(model_name, image_size)
    kind = variant.split("_p")[0]
    if kind in ("floor", "head"):
        model.requires_grad_(False)
        if kind == "head":
            model.classifier.requires_grad_(True)
    elif kind in ("lora", "dora"):
        p = float(variant.split("_p")[1])
        lora_vit.inject_lora(
            model, ("q", "k", "v"), r=common.RANK, alpha=common.ALPHA, dropout=p, use_dora=kind == "dora"
        )
    elif kind in _PEFT_KINDS:
        import peft

        p = float(variant.split("_p")[1])
        config = peft.LoraConfig(
            r=common.RANK, lora_alpha=common.ALPHA, lora_dropout=p, target_modules=list(common.QKV),
            use_dora=kind == "peftdora",
        )
        model = peft.get_peft_model(model, config)
    elif kind != "full":
        raise ValueError(f"unknown variant {variant!r}")
    return model.train()


def make_step(
    variant: str, args: argparse.Namespace, compiled: bool
) -> tuple[nn.Module, Callable[[], None], Callable[[], torch.Tensor]]:
    """(model, one training step, a forward-only call) of one variant on ``args.device``."""
    model = make_model(variant, args.model, args.image_size).to(args.device)
    forward_module: Callable = torch.compile(model, fullgraph=True) if compiled else model
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(args.device)
    labels = torch.randint(common.NUM_LABELS, (args.batch,), generator=gen).to(args.device)
    if variant == "floor":
        pixels.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    loss_fn = nn.CrossEntropyLoss()

    def forward() -> torch.Tensor:
        with common.autocast(args.device, args.dtype):
            logits = forward_module(pixel_values=pixels).logits
        return loss_fn(logits.float(), labels)

    def step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        pixels.grad = None
        forward().backward()
        if optimizer is not None:
            optimizer.step()

    return model, step, forward


def probe(args: argparse.Namespace) -> None:
    """Subprocess entry: print one JSON line with the memory of one variant's step."""
    variant, compiled = args.probe.removesuffix("+c"), args.probe.endswith("+c")
    model, step, forward = make_step(variant, args, compiled)
    print(json.dumps(common.measure_step_memory(model, step, forward, args.device)))


def run_model(args: argparse.Namespace, keys: list[str]) -> list[dict]:
    """Time (in this process) and measure (in subprocesses) every variant of one model."""
    steps: dict[str, Callable[[], None]] = {}
    for key in keys:
        variant, compiled = key.removesuffix("+c"), key.endswith("+c")
        _, step, _ = make_step(variant, args, compiled)
        step()  # warm-up; compiles the +c rows
        step()
        steps[key] = step
        print(f"  {args.model} {key}: ready", file=sys.stderr)
    timing = common.interleaved_medians(steps, args.reps, args.device)
    if args.no_memory and args.device == "cuda":
        for key, step in steps.items():  # cheap, in this process: no model rebuild, no recompile
            timing[key]["cuda_peak_bytes"] = common.cuda_step_peak(step)
    del steps
    gc.collect()

    rows = []
    for key in keys:
        row = {"model": args.model, "variant": key, **timing[key]}
        row["images_per_s"] = args.batch / row["median_s"]
        if not args.no_memory:
            probe_args = [*_probe_args(args), "--probe", key, "--model", args.model]
            row.update(common.probe_in_subprocess(Path(__file__), probe_args))
        rows.append(row)
    _ratios(rows)
    return rows


def _probe_args(args: argparse.Namespace) -> list[str]:
    return [
        "--batch", str(args.batch), "--image-size", str(args.image_size),
        "--device", args.device, "--dtype", args.dtype,
    ]


def _ratios(rows: list[dict]) -> None:
    """Add time / memory ratios to the floor of the same mode and to PEFT of the same row."""
    by_key = {r["variant"]: r for r in rows}
    for row in rows:
        key = row["variant"]
        suffix = "+c" if key.endswith("+c") else ""
        floor = by_key.get("floor" + suffix)
        if floor:
            row["x_floor"] = common.ratio(row, floor)
            if row.get("saved_bytes") is not None and floor.get("saved_bytes"):
                row["saved_x_floor"] = row["saved_bytes"] / floor["saved_bytes"]
        # LoRA against PEFT's LoRA; DoRA against PEFT's DoRA and against lora_vit's LoRA.
        references = {"lora": {"peft": "peft"}, "dora": {"peft": "peftdora", "lora": "lora"}}
        for column, other in references.get(key.split("_p")[0], {}).items():
            ref = by_key.get(other + key[key.index("_p"):])
            if ref:
                row[f"x_{column}"] = common.ratio(row, ref)
                if row.get("saved_bytes") is not None and ref.get("saved_bytes"):
                    row[f"saved_x_{column}"] = row["saved_bytes"] / ref["saved_bytes"]
        for field in ("saved_bytes", "rss_peak_bytes", "cuda_peak_bytes"):
            if row.get(field) is not None:
                row[field.replace("_bytes", "_mib")] = row[field] / 2**20


COLUMNS = [
    ("model", "model", "s"),
    ("variant", "variant", "s"),
    ("median_s", "median s", ".3f"),
    ("images_per_s", "img/s", ".1f"),
    ("x_floor", "x floor", ".3f"),
    ("x_peft", "x PEFT", ".3f"),
    ("x_lora", "x LoRA", ".3f"),
    ("saved_mib", "saved act MiB", ".1f"),
    ("saved_x_floor", "act x floor", ".3f"),
    ("saved_x_peft", "act x PEFT", ".3f"),
    ("saved_x_lora", "act x LoRA", ".3f"),
    ("rss_peak_mib", "peak RSS MiB", ".0f"),
    ("cuda_peak_mib", "CUDA peak MiB", ".0f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, reps=5)
    parser.add_argument("--variants", nargs="+", help=f"subset of {BASE_VARIANTS} (floor always runs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.probe:
        probe(args)
        return
    wanted = args.variants or BASE_VARIANTS
    unknown = [v for v in wanted if v not in BASE_VARIANTS]
    if unknown:
        print(f"unknown variants skipped: {unknown} (known: {BASE_VARIANTS})", file=sys.stderr)
    base = [v for v in BASE_VARIANTS if v in wanted or v == "floor"]
    skipped = []
    if not common.peft_available():
        skipped = [v for v in base if v.startswith(_PEFT_KINDS)]
        base = [v for v in base if not v.startswith(_PEFT_KINDS)]
        print("PEFT is not installed (pip install 'lora-vit[bench]'): PEFT rows skipped", file=sys.stderr)
    compiled = [f"{v}+c" for v in COMPILED_VARIANTS if v in base] if args.compile or args.compile_only else []
    keys = compiled if args.compile_only else base + compiled

    env = common.environment(args.device)
    rows = []
    for model_name in args.models:
        args.model = model_name
        rows += run_model(args, keys)
        gc.collect()
    table = common.Table(COLUMNS, rows)
    print(table.text())
    title = (f"Training step, batch {args.batch}, {args.image_size} px, {args.dtype}, {args.device},"
             f" median of {args.reps} interleaved rounds")
    path = common.write_results(
        "train",
        {"environment": env, "args": vars(args), "skipped": skipped + unknown, "note": args.note, "rows": rows},
        {title: table},
        args.results_dir,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
