"""Inference benchmark: unmerged and merged LoRA against the base model, eager and compiled.

Variants (HF ``ViTForImageClassification`` from a config, ``eval()``, ``torch.inference_mode``):

- ``base``: the plain model.
- ``lora_unmerged``: ``lora_vit.inject_lora`` r=8 on q, k, v (B randomised so the adapter
  is not a no-op), adapters kept separate.
- ``lora_merged``: the same after ``lora_vit.merge_lora`` (plain ``nn.Linear`` layers again).
- ``peft_unmerged`` / ``peft_merged``: the same through PEFT (``merge_and_unload``); skipped
  if PEFT is not installed.
- ``dora_unmerged`` / ``dora_merged``: ``inject_lora(..., use_dora=True)`` (B randomised,
  magnitudes moved off the row norms); ``peftdora_unmerged``: PEFT's DoRA. DoRA rows carry
  ``x LoRA``, over the LoRA row of the same kind (unmerged DoRA over unmerged LoRA).

With ``--compile`` each is also timed under ``torch.compile(fullgraph=True)`` (``+c`` rows,
ratios to the compiled base).

    python benchmarks/bench_infer.py                      # ViT-S/16 and ViT-B/16, CPU, eager
    python benchmarks/bench_infer.py --compile --reps 10
    python benchmarks/bench_infer.py --variants lora_unmerged dora_unmerged dora_merged --compile   # DoRA goals
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import common
import torch
from torch import nn

import lora_vit

VARIANTS = [
    "base", "lora_unmerged", "lora_merged", "peft_unmerged", "peft_merged",
    "dora_unmerged", "dora_merged", "peftdora_unmerged",
]


def _randomise_b(model: nn.Module) -> None:
    """Give every LoRA B a non-zero value so unmerged and merged models do real work."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
            elif "lora_magnitude" in name:
                param.mul_(1.1)


def make_model(variant: str, model_name: str, image_size: int) -> nn.Module:
    model = common.build_vit(model_name, image_size)
    kind = variant.split("_")[0]
    if kind in ("lora", "dora"):
        lora_vit.inject_lora(
            model, ("q", "k", "v"), r=common.RANK, alpha=common.ALPHA, dropout=0.1, use_dora=kind == "dora"
        )
        _randomise_b(model)
        if variant.endswith("_merged"):
            model = lora_vit.merge_lora(model)
    elif kind in ("peft", "peftdora"):
        import peft

        config = peft.LoraConfig(
            r=common.RANK, lora_alpha=common.ALPHA, lora_dropout=0.1, target_modules=list(common.QKV),
            use_dora=kind == "peftdora",
        )
        model = peft.get_peft_model(model, config)
        _randomise_b(model)
        if variant.endswith("_merged"):
            model = model.merge_and_unload()
    elif variant != "base":
        raise ValueError(f"unknown variant {variant!r}")
    return model.eval().requires_grad_(False)


def make_call(variant: str, args: argparse.Namespace, compiled: bool) -> Callable[[], None]:
    model = make_model(variant, args.model, args.image_size).to(args.device)
    run: Callable = torch.compile(model, fullgraph=True) if compiled else model
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(args.device)

    def call() -> None:
        with torch.inference_mode(), common.autocast(args.device, args.dtype):
            run(pixel_values=pixels)

    return call


def run_model(args: argparse.Namespace, keys: list[str]) -> list[dict]:
    calls = {}
    for key in keys:
        calls[key] = make_call(key.removesuffix("+c"), args, key.endswith("+c"))
        for _ in range(2):  # warm-up; compiles the +c rows
            calls[key]()
        print(f"  {args.model} {key}: ready", file=sys.stderr)
    timing = common.interleaved_medians(calls, args.reps, args.device)
    rows = [{"model": args.model, "variant": k, **timing[k]} for k in keys]
    by_key = {r["variant"]: r for r in rows}
    for row in rows:
        suffix = "+c" if row["variant"].endswith("+c") else ""
        row["images_per_s"] = args.batch / row["median_s"]
        row["x_base"] = common.ratio(row, by_key["base" + suffix])
        kind, _, rest = row["variant"].partition("_")
        references = {"lora": {"peft": "peft"}, "dora": {"peft": "peftdora", "lora": "lora"}}
        for column, other in references.get(kind, {}).items():
            ref = by_key.get(f"{other}_{rest}")
            if ref:
                row[f"x_{column}"] = common.ratio(row, ref)
    return rows


COLUMNS = [
    ("model", "model", "s"),
    ("variant", "variant", "s"),
    ("median_s", "median s", ".4f"),
    ("images_per_s", "img/s", ".1f"),
    ("x_base", "x base", ".3f"),
    ("x_peft", "x PEFT", ".3f"),
    ("x_lora", "x LoRA", ".3f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, reps=15)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="subset of the variants (base always runs)")
    args = parser.parse_args()

    keys = [v for v in VARIANTS if v == "base" or v in (args.variants or VARIANTS)]
    skipped = []
    if not common.peft_available():
        skipped = [k for k in keys if k.startswith("peft")]
        keys = [k for k in keys if k not in skipped]
        print("PEFT is not installed (pip install 'lora-vit[bench]'): PEFT rows skipped", file=sys.stderr)
    # PEFT's DoRA does not compile with fullgraph=True (peft 0.21: a graph break in its
    # dequantize_module_weight type check), so it has no +c row.
    compiled = [f"{k}+c" for k in keys if not k.startswith("peftdora")]
    if args.compile_only:
        keys = compiled
    elif args.compile:
        keys += compiled
    env = common.environment(args.device)
    rows = []
    for model_name in args.models:
        args.model = model_name
        rows += run_model(args, keys)
    table = common.Table(COLUMNS, rows)
    print(table.text())
    title = (f"Inference, batch {args.batch}, {args.image_size} px, {args.dtype}, {args.device},"
             f" median of {args.reps} interleaved rounds")
    path = common.write_results(
        "infer",
        {"environment": env, "args": vars(args), "skipped": skipped,
         "note": args.note, "rows": rows},
        {title: table},
        args.results_dir,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
