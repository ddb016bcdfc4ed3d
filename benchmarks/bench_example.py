"""The morph-detection example's throughput (images/s): training, predict, and a plain PEFT loop beside it.

Three sections (``--sections``, default ``train``):

* ``train``: the example's training step, eager vs compiled, fp32 vs bf16 (below);
* ``predict``: the scoring step of ``predict`` (``Detector.score`` on a normalised batch, under
  ``torch.no_grad``) on a DINOv2-S-shaped and a ViT-B-shaped random backbone at their real
  sizes (224 px; patch 14 and 16): the backbone alone (``base``), the LoRA detector unmerged,
  and its ``export`` file loaded back (adapters merged), each eager and compiled;
* ``peft``: the example's training step against the loop a user would otherwise write with
  transformers + PEFT on the same backbone, batch, precision and threads (``LoraConfig`` with
  the example's r, alpha, dropout and q/k/v targets, a linear head on the CLS token,
  class-weighted BCE, AdamW, batches of pre-normalised tensors already in memory).

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
    python benchmarks/bench_example.py --sections predict peft --threads 2             # issue 21's figures
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from madlab.data.images import ImageDataset, make_loader
from madlab.data.samples import Sample
from madlab.io.config import Config, apply_overrides
from madlab.model.families import BackboneSpec
from madlab.model.network import MorphDetector, apply_strategy
from madlab.run.detector import Detector
from madlab.run.export import export_detector
from madlab.run.speed import autocast, compiled
from madlab.run.training import class_weights

VARIANTS = ["eager_fp32", "eager_bf16", "compiled_fp32", "compiled_bf16"]
SECTIONS = ["train", "predict", "peft"]
# Predict backbones at their real sizes: name -> (family, hidden, layers, heads, mlp, patch).
PREDICT_BACKBONES = {
    "dinov2_s14": ("dinov2", 384, 12, 6, 1536, 14),
    "vit_b16": ("vit", 768, 12, 12, 3072, 16),
    # CLIP ViT-L/14's vision tower in shape (a ViTModel: CLIP adds one LayerNorm and quick-GELU,
    # nothing that moves the cost).
    "clip_l14": ("vit", 1024, 24, 16, 4096, 14),
}
PREDICT_VARIANTS = ["base_eager", "unmerged_eager", "merged_eager", "base_compiled", "unmerged_compiled",
                    "merged_compiled"]


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
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
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


def random_backbone(name: str, image_size: int) -> tuple[nn.Module, BackboneSpec]:
    """A randomly initialised HF encoder shaped like ``name`` (:data:`PREDICT_BACKBONES`) and its spec."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    family, hidden, layers, heads, mlp, patch = PREDICT_BACKBONES[name]
    torch.manual_seed(0)
    if family == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                         mlp_ratio=mlp // hidden, patch_size=patch, image_size=image_size))
        norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    else:
        model = ViTModel(ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=mlp, patch_size=patch, image_size=image_size),
                         add_pooling_layer=False)
        norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return model.eval(), BackboneSpec(family, f"random {name}", None, image_size, *norm, "cls", hidden)


def predict_detectors(name: str, args: argparse.Namespace, config: Config, tmp: Path) -> dict[str, Detector]:
    """``base`` (no adapters), ``unmerged`` (LoRA injected, B randomised so the adapters do work) and
    ``merged`` (that detector written by ``export`` and loaded back), eager and compiled."""
    out = {}
    for kind in ("base", "unmerged"):
        backbone, spec = random_backbone(name, args.image_size)
        model = MorphDetector(backbone, spec, config.dropout_p)
        if kind == "unmerged":
            apply_strategy(model, config)
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if "lora_B" in param_name:
                        param.normal_(0, 0.02)
        meta = {"config": config.to_dict(), "strategy": config.strategy, "backbone": {"spec": spec.to_dict()},
                "threshold": {"value": 0.0, "score": "logit", "rule": "dev_eer"}}
        out[kind] = Detector(model.eval(), config, meta, tmp / f"{name}-{kind}.safetensors", "fp32", model)
    unmerged = out["unmerged"]
    export_detector(dataclasses.replace(unmerged, model=copy.deepcopy(unmerged.model)),
                    tmp / f"{name}-merged.safetensors")
    out["merged"] = Detector.load(tmp / f"{name}-merged.safetensors", [f"batch_size={args.batch}"])
    return out


def predict_section(args: argparse.Namespace, config: Config) -> tuple[list[dict], common.Table]:
    import tempfile

    rows = []
    for name in args.predict_models:
        with tempfile.TemporaryDirectory() as tmp:
            detectors = predict_detectors(name, args, config, Path(tmp))
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
        steps = {}
        for variant in args.predict_variants:
            kind, mode = variant.split("_")
            detector = detectors[kind]
            net = compiled(detector.model, True) if mode == "compiled" else detector.model
            scorer = Detector(detector.model, detector.config, detector.metadata, detector.path, "fp32", net)
            steps[variant] = (lambda s=scorer, batch=x: s.score(batch))
            steps[variant]()  # warm-up; compiles the compiled rows
            steps[variant]()
            print(f"  {name} {variant}: ready", file=sys.stderr)
        timing = common.interleaved_medians(steps, args.reps, args.device)
        for variant in args.predict_variants:
            row = {"model": name, "variant": variant, **timing[variant]}
            row["images_per_s"] = args.batch / row["median_s"]
            base = timing.get(f"base_{variant.split('_')[1]}")
            row["x_base"] = common.ratio(base, timing[variant]) if base else None
            row["x_unmerged_eager"] = (common.ratio(timing["unmerged_eager"], timing[variant])
                                       if "unmerged_eager" in timing else None)
            rows.append(row)
    columns = [("model", "backbone", "s"), ("variant", "variant", "s"), ("median_s", "median s", ".3f"),
               ("images_per_s", "img/s", ".1f"), ("x_base", "speed vs base (same mode)", ".3f"),
               ("x_unmerged_eager", "speed vs unmerged eager", ".2f")]
    return rows, common.Table(columns, rows)


def peft_step(args: argparse.Namespace, config: Config) -> Callable[[], None]:
    """The plain transformers + PEFT training loop a user would write for the same detector."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTModel

    hidden, layers, heads, mlp = common.MODELS[args.model]
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=mlp, image_size=args.image_size, patch_size=16),
                   add_pooling_layer=False)
    vit = get_peft_model(vit, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                         lora_dropout=config.lora_dropout, target_modules=list(common.QKV)))
    head = nn.Linear(hidden, 1)
    device = torch.device(args.device)
    vit, head = vit.to(device), head.to(device)
    params = [p for p in vit.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    n = max(2 * args.batch, 16)
    images = (torch.rand(n, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)) - 0.5)
    labels = (torch.arange(n) % 2).float()
    weights = torch.tensor([1.0, 1.0], device=device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images / 0.5, labels), batch_size=args.batch,
                                         shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    batches = itertools.cycle(loader)
    vit.train()
    head.train()
    dropout = nn.Dropout(config.dropout_p)
    precision = "bf16" if args.peft_precision == "bf16" else "fp32"

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            feature = vit(pixel_values=x).last_hidden_state[:, 0]
            logits = head(dropout(feature)).squeeze(-1)
        per_sample = nn.functional.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
        loss = (per_sample * weights[y.long()]).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def peft_section(args: argparse.Namespace, config: Config) -> tuple[list[dict], common.Table]:
    rows = []
    variant = f"eager_{args.peft_precision}"
    for name in args.models:
        args.model = name
        steps = {"example": make_step(variant, args, config), "transformers+peft": peft_step(args, config)}
        for step in steps.values():
            step()
            step()
        timing = common.interleaved_medians(steps, args.reps, args.device)
        for kind in steps:
            row = {"model": name, "loop": kind, "precision": args.peft_precision, **timing[kind]}
            row["images_per_s"] = args.batch / row["median_s"]
            row["x_peft"] = common.ratio(timing["transformers+peft"], timing[kind])
            rows.append(row)
    columns = [("model", "backbone", "s"), ("loop", "training loop", "s"), ("precision", "precision", "s"),
               ("median_s", "median s", ".3f"), ("images_per_s", "img/s", ".1f"),
               ("x_peft", "speed vs transformers+PEFT", ".3f")]
    return rows, common.Table(columns, rows)


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
    parser.add_argument("--sections", nargs="+", default=["train"], choices=SECTIONS,
                        help="what to measure (default: train, as before; the GPU suite relies on that)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--predict-models", nargs="+", default=["dinov2_s14", "vit_b16"],
                        choices=list(PREDICT_BACKBONES))
    parser.add_argument("--predict-variants", nargs="+", default=PREDICT_VARIANTS, choices=PREDICT_VARIANTS,
                        help="a subset of the predict rows (each mode needs its base row for the ratio)")
    parser.add_argument("--peft-precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="example config override, e.g. lora_target_modules=q,v (default: the example's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return parser.parse_args(argv)


def train_section(args: argparse.Namespace, config: Config) -> tuple[list[dict], common.Table]:
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
    return rows, common.Table(COLUMNS, rows)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(Config(), args.override)
    env = common.environment(args.device)
    rows: list[dict] = []
    tables = {}
    where = f"batch {args.batch}, {args.image_size} px, {args.device}, {torch.get_num_threads()} threads, median of" \
            f" {args.reps} interleaved rounds"
    if "train" in args.sections:
        part, table = train_section(args, config)
        rows += [{**r, "section": "train"} for r in part]
        tables[f"Example training step (LoRA {config.lora_target_modules} r={config.lora_r} + head), {where}"] = table
    if "predict" in args.sections:
        part, table = predict_section(args, config)
        rows += [{**r, "section": "predict"} for r in part]
        tables[f"predict scoring step (Detector.score, no_grad, fp32): base vs LoRA unmerged vs merged export,"
               f" {where}"] = table
    if "peft" in args.sections:
        if not common.peft_available():
            print("peft is not installed: the peft section is skipped", file=sys.stderr)
        else:
            part, table = peft_section(args, config)
            rows += [{**r, "section": "peft"} for r in part]
            tables[f"example training step vs a plain transformers+PEFT loop ({args.peft_precision}), {where}"] = table
    for title, table in tables.items():
        print(title)
        print(table.text())
    path = common.write_results("example", {"environment": env, "args": vars(args), "note": args.note, "rows": rows},
                                tables, args.results_dir)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
