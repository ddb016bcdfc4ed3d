"""LoRA inside nn.MultiheadAttention: a torchvision-shaped ViT, training step and inference.

The model has torchvision's ``VisionTransformer`` layout (``encoder.layers.encoder_layer_N``
with ``self_attention = nn.MultiheadAttention(batch_first=True)`` called with
``need_weights=False``, ``mlp.0``/``mlp.3``), built here from the sizes in ``common.MODELS``
so nothing needs torchvision. Adapters: ``lora_vit.inject_lora`` r=8, alpha=16 on q, k, v
(slices of each block's packed ``in_proj_weight``).

Training variants (ratios to the floor of the same mode):

- ``floor``: everything frozen, ``pixels.requires_grad_()``: the activation gradient flows
  back through every block, which any LoRA step must at least do.
- ``lora_p0`` / ``lora_p0.1``: LoRA on q, k, v with LoRA dropout 0 / 0.1.

Inference variants (``eval()``, ``torch.inference_mode``; ratios to the base):
``base``, ``lora_unmerged`` (B randomised), ``lora_merged`` (after ``merge_lora``: plain
``nn.MultiheadAttention`` again). With ``--compile`` each is also timed under
``torch.compile(fullgraph=True)`` (``+c`` rows). Saved activation memory of each training
variant is measured in this process with saved-tensor hooks (parameters excluded).

    python benchmarks/bench_mha.py --models vit_b16                # training and inference, CPU
    python benchmarks/bench_mha.py --models vit_b16 --compile --reps 9
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections import OrderedDict
from collections.abc import Callable

import common
import torch
from torch import nn

import lora_vit

TRAIN_VARIANTS = ["floor", "lora_p0", "lora_p0.1"]
INFER_VARIANTS = ["base", "lora_unmerged", "lora_merged"]


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchvisionLayoutViT(nn.Module):
    """torchvision's ``VisionTransformer`` module layout at one of ``common.MODELS``' sizes."""

    def __init__(self, name: str, image_size: int) -> None:
        super().__init__()
        dim, layers, heads, mlp = common.MODELS[name]
        self.conv_proj = nn.Conv2d(3, dim, 16, 16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // 16) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", _EncoderBlock(dim, heads, mlp)) for i in range(layers))
        )
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, common.NUM_LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


def make_model(variant: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = TorchvisionLayoutViT(args.model, args.image_size)
    if variant.startswith("lora"):
        dropout = float(variant.split("_p")[1]) if "_p" in variant else 0.1
        lora_vit.inject_lora(model, ("q", "k", "v"), r=common.RANK, alpha=common.ALPHA, dropout=dropout)
        if variant in ("lora_unmerged", "lora_merged"):
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.02)
            if variant == "lora_merged":
                lora_vit.merge_lora(model)
    else:
        model.requires_grad_(False)
    return model.to(args.device)


def make_train_step(variant: str, args: argparse.Namespace, compiled: bool) -> tuple[Callable, Callable, nn.Module]:
    model = make_model(variant, args).train()
    run: Callable = torch.compile(model, fullgraph=True) if compiled else model
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
            logits = run(pixels)
        return loss_fn(logits.float(), labels)

    def step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        pixels.grad = None
        forward().backward()
        if optimizer is not None:
            optimizer.step()

    return step, forward, model


def make_infer_call(variant: str, args: argparse.Namespace, compiled: bool) -> Callable[[], None]:
    model = make_model(variant, args).eval().requires_grad_(False)
    run: Callable = torch.compile(model, fullgraph=True) if compiled else model
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(args.device)

    def call() -> None:
        with torch.inference_mode(), common.autocast(args.device, args.dtype):
            run(pixels)

    return call


def _keys(variants: list[str], args: argparse.Namespace) -> list[str]:
    compiled = [f"{v}+c" for v in variants]
    if args.compile_only:
        return compiled
    return variants + (compiled if args.compile else [])


def run_train(args: argparse.Namespace) -> list[dict]:
    steps, saved = {}, {}
    for key in _keys(TRAIN_VARIANTS, args):
        step, forward, model = make_train_step(key.removesuffix("+c"), args, key.endswith("+c"))
        step()  # warm-up; compiles the +c rows
        step()
        probe = common.SavedTensors(model)
        with probe.watch():
            out = forward()
        del out
        saved[key] = probe.nbytes
        steps[key] = step
        print(f"  {args.model} train {key}: ready", file=sys.stderr)
    timing = common.interleaved_medians(steps, args.reps, args.device)
    rows = [{"model": args.model, "mode": "train", "variant": k, **timing[k], "saved_mib": saved[k] / 2**20}
            for k in steps]
    by_key = {r["variant"]: r for r in rows}
    for row in rows:
        floor = by_key["floor" + ("+c" if row["variant"].endswith("+c") else "")]
        row["x_ref"] = common.ratio(row, floor)
        row["saved_x_floor"] = row["saved_mib"] / floor["saved_mib"] if floor["saved_mib"] else None
        row["images_per_s"] = args.batch / row["median_s"]
    return rows


def run_infer(args: argparse.Namespace) -> list[dict]:
    calls = {}
    for key in _keys(INFER_VARIANTS, args):
        calls[key] = make_infer_call(key.removesuffix("+c"), args, key.endswith("+c"))
        for _ in range(2):
            calls[key]()
        print(f"  {args.model} infer {key}: ready", file=sys.stderr)
    timing = common.interleaved_medians(calls, args.reps, args.device)
    rows = [{"model": args.model, "mode": "infer", "variant": k, **timing[k]} for k in calls]
    by_key = {r["variant"]: r for r in rows}
    for row in rows:
        row["x_ref"] = common.ratio(row, by_key["base" + ("+c" if row["variant"].endswith("+c") else "")])
        row["images_per_s"] = args.batch / row["median_s"]
    return rows


COLUMNS = [
    ("model", "model", "s"),
    ("mode", "mode", "s"),
    ("variant", "variant", "s"),
    ("median_s", "median s", ".4f"),
    ("images_per_s", "img/s", ".1f"),
    ("x_ref", "x floor/base", ".3f"),
    ("saved_mib", "saved act MiB", ".1f"),
    ("saved_x_floor", "act x floor", ".3f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, reps=7)
    parser.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    args = parser.parse_args()
    env = common.environment(args.device)
    rows: list[dict] = []
    for model_name in args.models:
        args.model = model_name
        if args.mode in ("train", "both"):
            rows += run_train(args)
            gc.collect()
        if args.mode in ("infer", "both"):
            rows += run_infer(args)
            gc.collect()
    table = common.Table(COLUMNS, rows)
    print(table.text())
    title = (f"nn.MultiheadAttention (torchvision layout), batch {args.batch}, {args.image_size} px, {args.dtype},"
             f" {args.device}, median of {args.reps} interleaved rounds")
    path = common.write_results(
        "mha", {"environment": env, "args": vars(args), "note": args.note, "rows": rows}, {title: table},
        args.results_dir,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
