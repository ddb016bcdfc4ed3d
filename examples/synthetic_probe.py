#!/usr/bin/env python
"""Which cue do the synthetic attacks teach? A small CNN trained from scratch tells.

The shortcut check of a synthetic run (``synthetic_separability_auc``) asks whether one image
statistic separates the served attacks from the bona fides. This probe asks the harder
question: can a small convolutional network, trained from scratch on the attacks exactly as
``attacks=synthetic`` serves them (new ones every epoch, matched processing), tell them from
bona fides of people it never saw, and what does what it learned do on the data's own morph
methods? An AUC below 0.5 on a morph method means the attacks taught a cue those morphs
carry the other way round (the "blurred = attack" failure on sharpened morphs).

It uses the embedded ORL default (``face_crop=align``, landmark masks, the run's 60/20/20
split of people): training bona fides from the train people, held-out synthetic attacks
from the dev people (one fixed attack per bona fide), the dev people's landmark morphs
(what a change to the synthesis may be chosen on), and the test split's bona fides and
landmark morphs (which only report). The CNN is a diagnostic, not the detector: the detector is the LoRA ViT
of ``morph_detection.py``.

Examples:
  python examples/synthetic_probe.py                          # 32 px, attacks matched inside the face
  python examples/synthetic_probe.py --match whole            # matched over the whole image, as before
  python examples/synthetic_probe.py --morph-regions face     # self-morphs of the inner face only, as before
  python examples/synthetic_probe.py --image-size 64 --train blend   # supervised on blend morphs, for scale
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the madlab package lives beside this file

from madlab.attacks.sets import (
    MATCH_REGIONS,
    MODE_SOURCES,
    FixedAttackSet,
    SyntheticTrainSet,
    check_morph_regions,
    made_sources,
    uses_given,
)
from madlab.attacks.synthesis import MORPH_REGIONS, parse_mix
from madlab.data.images import ImageDataset
from madlab.data.samples import Sample
from madlab.evaluation.metrics import auc
from madlab.faces.cropping import CropLandmarks, CropPolicy
from madlab.io.config import Config
from madlab.model.backbone import cache_root
from madlab.sources.reading import load_samples


def _cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    # Global average pooling at the end: a local cue anywhere in the image counts.
    return nn.Sequential(block(3, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64),
                         nn.MaxPool2d(2), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1))


def _scores(net: nn.Module, items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat([net(torch.stack([x for x, _, _ in items[i:i + 128]])).squeeze(-1)
                          for i in range(0, len(items), 128)]).numpy()


def _method_aucs(scores: np.ndarray, samples: list[Sample]) -> dict[str, float]:
    labels = np.array([s.label for s in samples])
    methods = sorted({s.method for s in samples if s.label == 1})
    out = {}
    for method in methods:
        keep = np.array([s.label == 0 or s.method == method for s in samples])
        out[method] = auc(scores[keep], labels[keep])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--match", choices=MATCH_REGIONS, default="face",
                        help="where attacks get their photo's statistics (default: face, as training does)")
    parser.add_argument("--train", default="synthetic",
                        help="'synthetic', 'generated' or 'synthetic+generated' (bona fides and attacks made from"
                             " them; held-out attacks of the same kinds) or a morph method of the data")
    parser.add_argument("--morph-regions", default=",".join(MORPH_REGIONS),
                        help="comma-separated regions a self-morph may blend (default: all of"
                             f" {','.join(MORPH_REGIONS)}; 'face' alone is the synthesis before 2026-12-04)")
    parser.add_argument("--synthetic-methods", default=",".join(Config().synthetic_methods),
                        help="comma-separated synthetic methods, each alone or as name:weight (the"
                             f" synthetic_methods key; default: {','.join(Config().synthetic_methods)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args(argv)
    try:
        regions = check_morph_regions(tuple(args.morph_regions.split(",")))
    except ValueError as error:
        parser.error(f"--morph-regions {args.morph_regions!r}: {error}")
    try:
        mix = parse_mix(args.synthetic_methods.split(","))
    except ValueError as error:
        parser.error(f"--synthetic-methods {args.synthetic_methods!r}: {error}")
    _run(args, parser, regions, mix)
    return 0


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, regions: tuple[str, ...],
         mix: tuple[tuple[str, float], ...]) -> None:
    torch.manual_seed(args.seed)
    config = Config()
    samples, _ = load_samples(None, config.seed, config.morph_methods, config.morphs_per_face,
                              (config.train_val_pct, config.dev_pct), embedded=config.embedded_data,
                              crop=CropPolicy.from_config(config), cache=cache_root(args.cache_dir))
    split = {name: [s for s in samples if s.split == name] for name in ("train", "dev", "test")}
    size, norm = args.image_size, {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    landmarks = CropLandmarks(size)
    made = args.train in MODE_SOURCES and not uses_given(args.train)
    if made:
        train = SyntheticTrainSet(ImageDataset(split["train"], size, augment=True, **norm), args.train, landmarks,
                                  match=args.match, morph_regions=regions, mix=mix)

        def served(epoch: int) -> list:
            return [train[(k, 1000 * args.seed + epoch)] for k in range(len(train))]
    else:
        kept = [s for s in split["train"] if s.label == 0 or s.method == args.train]
        if not any(s.label for s in kept):
            parser.error(f"--train {args.train!r}: no morphs of that method; the data has {config.morph_methods}")
        train = ImageDataset(kept, size, augment=True, **norm)

        def served(epoch: int) -> list:
            return [train[k] for k in range(len(train))]
    dev = ImageDataset([s for s in split["dev"] if s.label == 0], size, **norm)
    held = FixedAttackSet(dev, config.seed, landmarks, match=args.match, morph_regions=regions, mix=mix,
                          kinds=made_sources(args.train) if made else ("synthetic",))
    # The dev people's given morphs: what a change to the synthesis may be chosen on; the
    # test split's morphs only report.
    dev_morphs = ImageDataset(split["dev"], size, **norm)
    dev_items = [dev_morphs[k] for k in range(len(dev_morphs))]
    held_items = [held[k] for k in range(len(held))]
    held_labels = np.array([s.label for s in held.samples])
    test = ImageDataset(split["test"], size, **norm)
    test_items = [test[k] for k in range(len(test))]
    net = _cnn()
    optimiser = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.01)
    history = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        items = served(epoch)
        net.train()
        order, total = torch.randperm(len(items)), 0.0
        for first in range(0, len(items), 32):
            batch = [items[int(i)] for i in order[first:first + 32]]
            x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
            loss = nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        row = {"epoch": epoch + 1, "train_loss": total / len(items),
               "held_out_synthetic_auc": auc(_scores(net, held_items), held_labels),
               **{f"dev_{m}_auc": v for m, v in _method_aucs(_scores(net, dev_items), dev_morphs.samples).items()},
               **{f"test_{m}_auc": v for m, v in _method_aucs(_scores(net, test_items), test.samples).items()}}
        history.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
              + f" ({time.perf_counter() - start:.1f} s)", flush=True)
    # Single epochs swing by several standard errors: the summary is the mean of the last
    # quarter of the epochs (at least 3).
    last = history[-max(3, args.epochs // 4):]
    summary = {k: round(float(np.mean([r[k] for r in last])), 3) for k in last[0] if k != "epoch"}
    print(json.dumps({"image_size": size, "train": args.train, "match": args.match, "epochs": args.epochs,
                      "morph_regions": list(regions), "synthetic_methods": dict(mix), "seed": args.seed,
                      f"mean_of_last_{len(last)}_epochs": summary}))


if __name__ == "__main__":
    sys.exit(main())
