"""Many adapters on one base: a mixed batch against one adapter, eager and compiled, and against PEFT.

HF ``ViTForImageClassification`` from a config (ViT-S/16 by default), ``--adapters`` adapters
(default 8) injected with ``lora_vit.inject_lora(..., adapter=name)``, r=8 on q, k, v, every B
randomised. The mix spreads the batch evenly over the adapters (sample ``i`` through adapter
``i mod n``). Variants:

- ``base``: the base model (``set_adapter(model, None)``), the floor of any mixed batch: its
  ``x PEFT`` is the lowest ratio to PEFT that any LoRA forward could reach.
- ``one``: the whole batch through one adapter (``set_adapter``): the single-adapter fused path.
- ``mixed``: the batch mixed with ``adapter_per_sample`` (stacked factors, one gather and two
  batched matmuls per layer); ``x one`` is its time over ``one``'s in the same round.
- ``peft_mixed``: PEFT (same adapters, same factors) forward with ``adapter_names=`` (its mixed
  batch inference, a loop over sub-batches); skipped without PEFT. ``mixed`` carries ``x PEFT``.
- ``train_one`` / ``train_mixed``: a training step (forward, cross-entropy, backward) with one
  adapter or the mix; PEFT has no mixed-batch training, so no PEFT row.
- ``one_head`` / ``mixed_heads`` / ``train_one_head`` / ``train_mixed_heads``: the same with
  every adapter owning its own classification head (``inject_lora(..., trainable=["classifier"],
  adapter=name)``, each head randomised): one adapter with its head, against the batch mixed
  over the adapters and their heads (every head runs on the whole batch, each sample keeps its
  own head's row). ``x one adapter`` compares with the ``*_head`` row of one adapter.

With ``--compile`` the lora-vit variants are also timed under ``torch.compile(fullgraph=True)``
(``+c``; routing is set before the timed calls, as a long-lived server would).

    python benchmarks/bench_multi.py                               # ViT-S/16, batch 32 / 16, CPU, eager
    python benchmarks/bench_multi.py --compile --reps 5
    python benchmarks/bench_multi.py --device cuda --dtype bf16 --compile --batch 128 --train-batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

import common
import torch
import torch.nn.functional as F
from torch import nn

import lora_vit

INFER = ["base", "one", "mixed", "peft_mixed", "one_head", "mixed_heads"]
TRAIN = ["train_one", "train_mixed", "train_one_head", "train_mixed_heads"]
HEAD = "classifier"  # HF ViTForImageClassification's head


def adapter_names(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def mix(batch: int, count: int) -> list[str]:
    """Sample i through adapter i mod count: the batch spread evenly."""
    names = adapter_names(count)
    return [names[i % count] for i in range(batch)]


def _factors(count: int, model_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Random non-zero factors and a random head per adapter (the factors shared with PEFT), under lora-vit keys."""
    probe = lora_vit.inject_lora(common.build_vit(model_name, 32), common.QKV, r=common.RANK, alpha=common.ALPHA,
                                 trainable=[HEAD])
    gen = torch.Generator().manual_seed(2)
    return {
        name: {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in lora_vit.lora_state_dict(probe).items()}
        for name in adapter_names(count)
    }


def make_lora(args: argparse.Namespace, factors: dict, heads: bool = False) -> nn.Module:
    model = common.build_vit(args.model, args.image_size)
    for name, state in factors.items():
        lora_vit.inject_lora(model, common.QKV, r=common.RANK, alpha=common.ALPHA, dropout=0.0, adapter=name,
                             trainable=[HEAD] if heads else ())
        if not heads:
            state = {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
        lora_vit.load_lora_state_dict(model, state, adapter=name)
    return model


def make_peft(args: argparse.Namespace, factors: dict) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=common.RANK, lora_alpha=common.ALPHA, lora_dropout=0.0, target_modules=list(common.QKV))
    names = list(factors)
    model = peft.get_peft_model(common.build_vit(args.model, args.image_size), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for name, state in factors.items():
            for key, value in state.items():
                if key.startswith(HEAD + "."):  # PEFT rows run without per-adapter heads
                    continue
                layer, _, factor = key.rpartition(".")
                target = model.base_model.model.get_submodule(layer)
                getattr(target, factor)[name].weight.copy_(value)
    return model.eval()


def make_call(variant: str, args: argparse.Namespace, factors: dict, compiled: bool) -> Callable[[], None]:
    training = variant.startswith("train")
    batch = args.train_batch if training else args.batch
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(args.device)
    labels = torch.randint(common.NUM_LABELS, (batch,), generator=gen).to(args.device)
    names = mix(batch, args.adapters)
    if variant == "peft_mixed":
        model = make_peft(args, factors).to(args.device)

        def peft_call() -> None:
            with torch.inference_mode(), common.autocast(args.device, args.dtype):
                model(pixel_values=pixels, adapter_names=names)

        return peft_call
    heads = variant.endswith(("_head", "_heads"))
    model = make_lora(args, factors, heads).to(args.device).train(training)
    if not training:
        model.requires_grad_(False)
    # Routing is set once, for the variant's lifetime (its own model), outside the timed calls.
    routing = contextlib.ExitStack()
    if variant.endswith(("mixed", "mixed_heads")):
        routing.enter_context(lora_vit.adapter_per_sample(model, names))
    elif variant == "base":
        lora_vit.set_adapter(model, None)
    run: Callable = torch.compile(model, fullgraph=True) if compiled else model
    if training:

        def step() -> None:
            with common.autocast(args.device, args.dtype):
                loss = F.cross_entropy(run(pixel_values=pixels).logits, labels)
            loss.backward()
            model.zero_grad(set_to_none=True)

        step.routing = routing  # type: ignore[attr-defined]  # kept alive with the call
        return step

    def call() -> None:
        with torch.inference_mode(), common.autocast(args.device, args.dtype):
            run(pixel_values=pixels)

    call.routing = routing  # type: ignore[attr-defined]
    return call


def run_model(args: argparse.Namespace, keys: list[str]) -> list[dict]:
    factors = _factors(args.adapters, args.model)
    calls = {}
    for key in keys:
        calls[key] = make_call(key.removesuffix("+c"), args, factors, key.endswith("+c"))
        for _ in range(2):  # warm-up; compiles the +c rows
            calls[key]()
        print(f"  {args.model} {key}: ready", file=sys.stderr)
    timing = common.interleaved_medians(calls, args.reps, args.device)
    rows = [{"model": args.model, "variant": k, **timing[k]} for k in keys]
    by_key = {r["variant"]: r for r in rows}
    for row in rows:
        variant = row["variant"]
        training = variant.startswith("train")
        row["batch"] = args.train_batch if training else args.batch
        row["images_per_s"] = row["batch"] / row["median_s"]
        suffix = "+c" if variant.endswith("+c") else ""
        if variant.removesuffix("+c") == "base" and "peft_mixed" in by_key:
            row["x_peft"] = common.ratio(row, by_key["peft_mixed"])
        plain = variant.removesuffix("+c")
        if plain.endswith(("mixed", "mixed_heads")) and not variant.startswith("peft"):
            one_name = ("train_one" if training else "one") + ("_head" if plain.endswith("_heads") else "")
            one = by_key.get(one_name + suffix)
            if one:
                row["x_one"] = common.ratio(row, one)
            if not training and "peft_mixed" in by_key and plain == "mixed":
                row["x_peft"] = common.ratio(row, by_key["peft_mixed"])
    return rows


COLUMNS = [
    ("model", "model", "s"),
    ("variant", "variant", "s"),
    ("batch", "batch", "d"),
    ("median_s", "median s", ".4f"),
    ("images_per_s", "img/s", ".1f"),
    ("x_one", "x one adapter", ".3f"),
    ("x_peft", "x PEFT mixed", ".3f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, reps=7)
    parser.set_defaults(models=["vit_s16"], batch=32)
    parser.add_argument("--train-batch", type=int, default=16, help="batch of the training rows")
    parser.add_argument("--adapters", type=int, default=8, help="named adapters on the model")
    parser.add_argument("--variants", nargs="+", choices=INFER + TRAIN, help="subset of the variants")
    args = parser.parse_args()

    keys = [v for v in INFER + TRAIN if v in (args.variants or INFER + TRAIN)]
    skipped = []
    if not common.peft_available():
        skipped = [k for k in keys if k.startswith("peft")]
        keys = [k for k in keys if k not in skipped]
        print("PEFT is not installed (pip install 'lora-vit[bench]'): PEFT rows skipped", file=sys.stderr)
    compiled = [f"{k}+c" for k in keys if not k.startswith("peft")]  # PEFT's mixed batch is a Python loop
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
    title = (f"{args.adapters} adapters r={common.RANK} on q, k, v; inference batch {args.batch}, training batch"
             f" {args.train_batch}, {args.image_size} px, {args.dtype}, {args.device},"
             f" median of {args.reps} interleaved rounds")
    path = common.write_results(
        "multi",
        {"environment": env, "args": vars(args), "skipped": skipped, "note": args.note, "rows": rows},
        {title: table},
        args.results_dir,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
