"""Where a run's attacks come from: the data's morphs (``given``), made from bona fides, or both.

Two kinds are made from bona fides, so that bona fides alone train: ``synthetic`` attacks
alter one photo (:mod:`.synthesis`); ``generated`` morphs combine two photos of the same
split, of two people or two shots of one (:mod:`.generated`). :data:`MODE_SOURCES` says which
sources each ``attacks`` mode uses. :class:`SyntheticTrainSet` serves every training bona fide
twice, once as itself and once as an attack made from it (with several made kinds, the bona
fides take turns), with new random attacks each time it is read, so every epoch sees new
ones. Every item, whatever its class, then gets the same random processing
(:func:`~.processing.matched_augment`), so processing marks neither class.

The dev split decides the checkpoint and the threshold. Where it has morphs of its own,
those are used; where it has only bona fides, :class:`FixedAttackSet` adds one synthetic
attack per dev bona fide, made once from the run's seed so that every epoch is judged on
the same images. :func:`dev_attacks` returns the set and the sentence the report carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.images import ImageDataset
from ..data.samples import SPLITS, DataError, DataReport, Sample
from ..io.config import ATTACK_MODES, MATCH_REGIONS, Config, ConfigError
from .generated import Pairing, generate_morph
from .morphs import MORPH_METHODS
from .processing import match_statistics, matched_augment
from .synthesis import DEFAULT_MIX, MORPH_REGIONS, Attack, parse_mix, synthesise

__all__ = [
    "ATTACK_MODES",
    "DEFAULT_MATCH",
    "GENERATED_METHOD",
    "MADE_METHODS",
    "MATCH_REGIONS",
    "MODE_SOURCES",
    "SYNTHETIC_METHOD",
    "EpochSeeds",
    "FixedAttackSet",
    "SyntheticTrainSet",
    "check_attack_config",
    "check_morph_regions",
    "dev_attacks",
    "drop_methods",
    "made_sources",
    "matched_attack",
    "required_morphs",
    "training_sets",
    "uses_given",
]

SYNTHETIC_METHOD = "synthetic"
GENERATED_METHOD = "generated"
MADE_METHODS = (SYNTHETIC_METHOD, GENERATED_METHOD)  # the attack kinds made from bona fides
# The sources of each ``attacks`` mode (io.config.ATTACK_MODES names the same modes; a test
# keeps the two in step). ``both`` is the given morphs plus synthetic attacks.
MODE_SOURCES = {
    "given": ("given",),
    "synthetic": (SYNTHETIC_METHOD,),
    "generated": (GENERATED_METHOD,),
    "both": ("given", SYNTHETIC_METHOD),
    "synthetic+generated": (SYNTHETIC_METHOD, GENERATED_METHOD),
    "given+generated": ("given", GENERATED_METHOD),
}
# Where a synthetic attack is matched to its photo's statistics (processing.match_statistics;
# io.config.MATCH_REGIONS): over the whole image, as tools sharpen a morph and as generated morphs
# are matched. A face whose texture was averaged then stays softer than its frame, as in every
# spliced morph sharpened to its contributors' sharpness. Chosen on the dev people's given morphs
# on the default backbone over five seeds (examples/README.md, "Matched over the whole image").
DEFAULT_MATCH = "whole"

Landmarks = Callable[[Sample], "np.ndarray | None"]


def _photo(pixels: torch.Tensor) -> np.ndarray:
    """``3 x H x W`` uint8 to ``H x W x 3`` float64 in [0, 1]."""
    return pixels.permute(1, 2, 0).numpy().astype(np.float64) / 255.0


def _uint8(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1).copy())


def _pseudo_sample(bona_fide: Sample, kind: str) -> Sample:
    """The row that stands for an attack of ``kind`` made from ``bona_fide`` (same split and identity)."""
    return replace(bona_fide, path=f"{bona_fide.path}#{kind}", label=1, method=kind, image=None)


def _mode(mode: str) -> tuple[str, ...]:
    if mode not in MODE_SOURCES:
        raise ValueError(f"attacks must be one of {tuple(MODE_SOURCES)}, got {mode!r}")
    return MODE_SOURCES[mode]


def uses_given(mode: str) -> bool:
    """Whether ``attacks=mode`` trains on the data's own morphs."""
    return "given" in _mode(mode)


def made_sources(mode: str) -> tuple[str, ...]:
    """The kinds ``attacks=mode`` makes from bona fides (of :data:`MADE_METHODS`), in a fixed order."""
    return tuple(source for source in _mode(mode) if source in MADE_METHODS)


def check_attack_config(config: Config) -> tuple[tuple[str, float], ...]:
    """Check the config keys the attack registries answer; return the synthetic mix.

    ``morph_methods`` must be a non-empty subset of the given methods (:data:`~.morphs.MORPH_METHODS`),
    ``synthetic_methods`` a mix of :data:`~.synthesis.SYNTHETIC_METHODS` (:func:`~.synthesis.parse_mix`),
    and ``generated_flow_p`` is refused above 0 by a mode that generates no morphs (it would do nothing).

    Raises:
        ConfigError: Naming the bad value and the methods (or modes) there are.
    """
    unknown = [m for m in config.morph_methods if m not in MORPH_METHODS]
    if unknown or not config.morph_methods:
        raise ConfigError(f"morph_methods {config.morph_methods} must be a non-empty subset of {list(MORPH_METHODS)}")
    if config.generated_flow_p > 0 and GENERATED_METHOD not in made_sources(config.attacks):
        generating = [m for m in MODE_SOURCES if GENERATED_METHOD in MODE_SOURCES[m]]
        raise ConfigError(f"generated_flow_p={config.generated_flow_p} aligns generated morphs, but"
                          f" attacks={config.attacks} generates none; use it with attacks in {generating}")
    try:
        return parse_mix(config.synthetic_methods)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_match(match: str) -> str:
    if match not in MATCH_REGIONS:
        raise ValueError(f"match must be one of {MATCH_REGIONS}, got {match!r}")
    return match


def check_morph_regions(regions: tuple[str, ...]) -> tuple[str, ...]:
    """``regions`` if it is a non-empty subset of :data:`~.synthesis.MORPH_REGIONS`.

    Raises:
        ValueError: Naming the bad value and the regions there are.
    """
    regions = tuple(regions)
    if not regions or not set(regions) <= set(MORPH_REGIONS):
        raise ValueError(f"morph_regions must be a non-empty subset of {MORPH_REGIONS}, got {regions!r}")
    return regions


def matched_attack(attack: Attack, photo: np.ndarray, match: str = DEFAULT_MATCH) -> np.ndarray:
    """``attack`` given ``photo``'s statistics inside its mask (``face``) or over the whole image."""
    return match_statistics(attack.image, photo, attack.weight if match == "face" else None)


@dataclass(frozen=True)
class AttackMaker:
    """How a split's bona fides become attacks: the settings both attack sets share.

    Args:
        base: The split the attacks are made from (and, for ``generated``, whose bona fides are paired).
        landmarks: As for :class:`SyntheticTrainSet`.
        match: As for :class:`SyntheticTrainSet` (synthetic attacks only; generated morphs are
            matched over the whole image, see :mod:`.generated`).
        morph_regions: As for :class:`SyntheticTrainSet`.
        mix: The synthetic methods and their shares.
        morph_methods: The methods generated morphs are combined by (of :data:`~.morphs.MORPH_METHODS`).
        flow_p: How often a generated morph's faces are also aligned along their optical flow.

    Raises:
        ValueError: If ``flow_p`` is not a probability.
    """

    base: ImageDataset
    landmarks: Landmarks | None = None
    match: str = DEFAULT_MATCH
    morph_regions: tuple[str, ...] = MORPH_REGIONS
    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX
    morph_methods: tuple[str, ...] = tuple(MORPH_METHODS)
    flow_p: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flow_p <= 1.0:
            raise ValueError(f"flow_p must be a probability in [0, 1], got {self.flow_p!r}")

    def points(self, index: int) -> np.ndarray | None:
        return self.landmarks(self.base.samples[index]) if self.landmarks else None

    @cached_property
    def pairing(self) -> Pairing:
        return Pairing(self.base.samples)

    def make(self, kind: str, index: int, photo: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """An attack of ``kind`` made from bona fide ``index`` (whose pixels are ``photo``), and
        what made it (``self_morph+frequency``, ``generated:blend``, ``generated:splice:same_person``)."""
        if kind == GENERATED_METHOD:
            partner, same_person = self.pairing.partner(index, rng)
            image, method = generate_morph(photo, _photo(self.base.pixels(partner)), rng, self.points(index),
                                           self.points(partner), self.morph_methods, self.flow_p)
            return image, f"{GENERATED_METHOD}:{method}" + (":same_person" if same_person else "")
        attack = synthesise(photo, rng, self.points(index), morph_regions=self.morph_regions, mix=self.mix)
        return matched_attack(attack, photo, self.match), attack.method


def _bona_fide_indices(base: ImageDataset, what: str) -> list[int]:
    found = [i for i, s in enumerate(base.samples) if s.label == 0]
    if not found:
        raise DataError(f"synthetic attacks are made from bona fides, but the {what} has none"
                        f" ({len(base.samples)} morphs)")
    return found


class SyntheticTrainSet(Dataset):
    """Training items with attacks synthesised anew on every read.

    Args:
        base: The training split (its cache, input size, normalisation and flip/shift setting are used).
        mode: An ``attacks`` mode that makes attacks (:func:`made_sources` not empty): ``synthetic``,
            ``generated`` or ``synthetic+generated`` (bona fides and attacks made from them), or
            ``both`` or ``given+generated`` (also the given morphs).
        landmarks: Returns a sample's five landmarks in the pixel coordinates of its ``size x size``
            image, or None for the centred-ellipse mask; None = no landmarks for any sample.
        match: ``face``: each attack gets its photo's statistics inside its mask; ``whole``: over
            the whole image (see :func:`~.processing.match_statistics`).
        morph_regions: The regions a self-morph may blend (see :func:`~.synthesis.self_morph`);
            training uses all of them, a subset is there to measure what each teaches.
        mix: The synthetic methods and their shares (:func:`~.synthesis.parse_mix`).
        morph_methods: The methods generated morphs combine two photos by.
        resample_p: How often an item, of either class, is resampled before the shared
            processing (:func:`~.processing.matched_augment`).
        flow_p: How often a generated morph's faces are also aligned along their optical flow
            (:func:`~.generated.generate_morph`).

    Shapes:
        ``dataset[i]``: ``(3 x size x size float32, scalar label, i)``, as :class:`~.images.ImageDataset`.

    Raises:
        DataError: If the split has no bona fides (or, for ``generated``, fewer than two).
        ValueError: If ``mode``, ``match`` or ``morph_regions`` is not one of its choices.
    """

    def __init__(self, base: ImageDataset, mode: str, landmarks: Landmarks | None = None,
                 match: str = DEFAULT_MATCH, morph_regions: tuple[str, ...] = MORPH_REGIONS,
                 mix: tuple[tuple[str, float], ...] = DEFAULT_MIX,
                 morph_methods: tuple[str, ...] = tuple(MORPH_METHODS), resample_p: float = 0.0,
                 flow_p: float = 0.0) -> None:
        kinds = made_sources(mode)
        if not 0.0 <= resample_p <= 1.0:
            raise ValueError(f"resample_p must be a probability in [0, 1], got {resample_p!r}")
        self.resample_p = resample_p
        if not kinds:
            raise ValueError(f"mode must be one that makes attacks, one of"
                             f" {tuple(m for m in MODE_SOURCES if made_sources(m))}, got {mode!r}")
        self.base = base
        self.maker = AttackMaker(base, landmarks, _check_match(match), check_morph_regions(morph_regions), mix,
                                 tuple(morph_methods), flow_p)
        bona_fides = _bona_fide_indices(base, "training split")
        if GENERATED_METHOD in kinds:
            self.maker.pairing  # noqa: B018 - a split that cannot be paired fails here, not in a worker
        given = [i for i, s in enumerate(base.samples) if s.label == 1] if uses_given(mode) else []
        # With two made kinds the bona fides take turns, so each kind is half the attacks.
        self._items = ([(i, None) for i in bona_fides + given]
                       + [(i, kinds[k % len(kinds)]) for k, i in enumerate(bona_fides)])
        self.samples = [_pseudo_sample(base.samples[i], kind) if kind else base.samples[i] for i, kind in self._items]

    @property
    def fully_cached(self) -> bool:
        """Whether the loader may serve items from the main process (see :func:`~.images.make_loader`).

        On CUDA the synthesis is the loader's work and the step is fast, so items are made in
        ``num_workers`` processes beside the training step; on CPU the step needs the cores.
        Served through :class:`EpochSeeds`, the items are the same either way.
        """
        return self.base.fully_cached and not torch.cuda.is_available()

    @property
    def cached(self) -> int:
        """How many items are made from cached pixels."""
        return sum(1 for i, _ in self._items if i < self.base.cached)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Item ``index``, made anew: ``(index, epoch_seed)`` (from :class:`EpochSeeds`) fixes every random
        choice by that pair alone; a plain ``index`` draws its seed from torch's global generator."""
        if isinstance(index, tuple):
            index, epoch_seed = index
            rng = np.random.default_rng([epoch_seed, index])
        else:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        i, kind = self._items[index]
        photo = _photo(self.base.pixels(i))
        if kind is not None:
            photo, _ = self.maker.make(kind, i, photo, rng)
        x = torch.from_numpy(matched_augment(photo, rng, self.resample_p).transpose(2, 0, 1).astype(np.float32))
        x = (x - self.base.mean) / self.base.std
        if self.base.augment:
            if rng.random() < 0.5:
                x = x.flip(-1)
            shift = max(1, self.base.size // 16)
            dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        return x, torch.tensor(float(self.samples[index].label)), index


class EpochSeeds(Sampler):
    """The indices of ``sampler``, each paired with one seed drawn from ``generator`` per epoch.

    :class:`SyntheticTrainSet` makes item ``(index, seed)`` from ``[seed, index]`` alone, so
    what a loader serves depends on ``generator`` and nothing else: not on how many worker
    processes make the items or which worker makes which (no two share a random stream),
    and a run resumed with ``generator``'s saved state serves what the uninterrupted run
    would. The seed is drawn in the main process when an epoch's iteration starts, after the
    previous epoch's indices were all drawn.
    """

    def __init__(self, sampler: Sampler, generator: torch.Generator) -> None:
        self.sampler = sampler
        self.generator = generator

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        for index in self.sampler:
            yield int(index), seed


class FixedAttackSet(Dataset):
    """Bona fides plus one attack made from each, once, from ``seed``: a fixed dev set.

    Attack ``k`` depends only on ``seed`` and the position of its bona fide, so every epoch
    and every resumed run is judged on the same images. Attacks are matched to their bona
    fide (synthetic ones where ``match`` says, :func:`~.processing.match_statistics`) but not
    augmented, like the bona fides. With two made kinds the bona fides take turns.

    Args:
        base: The dev split.
        seed: Fixes every attack.
        landmarks: As for :class:`SyntheticTrainSet`.
        match: As for :class:`SyntheticTrainSet`.
        morph_regions: As for :class:`SyntheticTrainSet`.
        mix: As for :class:`SyntheticTrainSet`.
        kinds: Which of :data:`MADE_METHODS` to make.
        morph_methods: As for :class:`SyntheticTrainSet`.
        flow_p: As for :class:`SyntheticTrainSet`.

    Raises:
        DataError: If ``base`` has no bona fides (or, for ``generated``, fewer than two).
        ValueError: If ``match`` is not one of :data:`MATCH_REGIONS`, ``morph_regions`` not a
            subset of :data:`~.synthesis.MORPH_REGIONS` or ``kinds`` empty or unknown.
    """

    def __init__(self, base: ImageDataset, seed: int, landmarks: Landmarks | None = None,
                 match: str = DEFAULT_MATCH, morph_regions: tuple[str, ...] = MORPH_REGIONS,
                 mix: tuple[tuple[str, float], ...] = DEFAULT_MIX, kinds: tuple[str, ...] = (SYNTHETIC_METHOD,),
                 morph_methods: tuple[str, ...] = tuple(MORPH_METHODS), flow_p: float = 0.0) -> None:
        if not kinds or not set(kinds) <= set(MADE_METHODS):
            raise ValueError(f"kinds must be a non-empty subset of {MADE_METHODS}, got {kinds!r}")
        self.base = base
        maker = AttackMaker(base, landmarks, _check_match(match), check_morph_regions(morph_regions), mix,
                            tuple(morph_methods), flow_p)
        self._bona_fides = _bona_fide_indices(base, "dev split")
        made = [kinds[k % len(kinds)] for k in range(len(self._bona_fides))]
        self.attacks = []
        for k, (i, kind) in enumerate(zip(self._bona_fides, made)):
            image, method = maker.make(kind, i, _photo(base.pixels(i)), np.random.default_rng([seed, k]))
            self.attacks.append((_uint8(image), method))
        self.samples = ([base.samples[i] for i in self._bona_fides]
                        + [_pseudo_sample(base.samples[i], kind) for i, kind in zip(self._bona_fides, made)])
        self.fully_cached = True
        self.cached = len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int) -> torch.Tensor:
        """The ``3 x size x size`` uint8 image (a bona fide from the base set, or its fixed attack)."""
        n = len(self._bona_fides)
        return self.base.pixels(self._bona_fides[index]) if index < n else self.attacks[index - n][0]

    def methods(self) -> list[str]:
        """What made each fixed attack (``self_blend``, ``self_morph``, ``+frequency``, ``generated:blend``, ...)."""
        return [method for _, method in self.attacks]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = (self.pixels(index).float() / 255.0 - self.base.mean) / self.base.std
        return x, torch.tensor(float(self.samples[index].label)), index


def dev_attacks(dev: ImageDataset, mode: str, seed: int, landmarks: Landmarks | None = None,
                mix: tuple[tuple[str, float], ...] = DEFAULT_MIX,
                morph_methods: tuple[str, ...] = tuple(MORPH_METHODS), flow_p: float = 0.0,
                match: str = DEFAULT_MATCH) -> tuple[Dataset, str]:
    """The dev set a run selects its checkpoint and threshold on, and a sentence saying where its attacks come from.

    Given dev morphs are used where the dev split has them (with any ``mode``); otherwise,
    with a mode that makes attacks, :class:`FixedAttackSet` supplies seeded ones of its kinds.

    Raises:
        DataError: With ``given`` and a dev split without morphs.
    """
    morphs: Sequence[Sample] = [s for s in dev.samples if s.label == 1]
    if morphs:
        methods = sorted({s.method for s in morphs})
        return dev, (f"dev attacks: the {len(morphs)} given dev morphs ({', '.join(methods)}) against"
                     f" {len(dev.samples) - len(morphs)} dev bona fides")
    kinds = made_sources(mode)
    if not kinds:
        raise DataError(f"the dev split has {len(dev.samples)} bona fides and no morphs; attacks={mode} needs"
                        " dev morphs (or use attacks=synthetic, generated or both)")
    fixed = FixedAttackSet(dev, seed, landmarks, match=match, mix=mix, kinds=kinds, morph_methods=morph_methods,
                           flow_p=flow_p)
    return fixed, (f"dev attacks: {len(fixed.attacks)} {' and '.join(kinds)} attacks, one from each dev bona fide,"
                   f" made once from seed={seed} (the dev split has no morphs)")


def required_morphs(mode: str, testing: bool = False) -> tuple[str, ...]:
    """The splits that must hold given morphs: all with ``given``; otherwise only test, and only to test."""
    if mode == "given":
        return SPLITS
    return ("test",) if testing else ()


def drop_methods(samples: list[Sample], methods: list[str], report: DataReport) -> list[Sample]:
    """Leave methods out of training: drop their morphs from the train and dev splits; test keeps them.

    Raises:
        DataError: If a named method has no morphs in the data (the message lists those it has).
    """
    if not methods:
        return samples
    present = sorted({s.method for s in samples if s.label == 1})
    unknown = sorted(set(methods) - set(present))
    if unknown:
        raise DataError(f"exclude_methods names {unknown}, which the data has no morphs of; its methods: {present}")
    kept = [s for s in samples if not (s.label == 1 and s.method in methods and s.split != "test")]
    in_test = sum(1 for s in kept if s.label == 1 and s.method in methods)
    report.notes.append(f"exclude_methods={sorted(methods)}: dropped their {len(samples) - len(kept)} train/dev"
                        f" morphs; the test split keeps their {in_test} morphs, never seen in training")
    return kept


def training_sets(train: ImageDataset, dev: ImageDataset, mode: str, seed: int, landmarks: Landmarks | None = None,
                  mix: tuple[tuple[str, float], ...] = DEFAULT_MIX,
                  morph_methods: tuple[str, ...] = tuple(MORPH_METHODS),
                  resample_p: float = 0.0, flow_p: float = 0.0,
                  match: str = DEFAULT_MATCH) -> tuple[Dataset, Dataset, str]:
    """The training and dev sets for ``attacks=mode``, and the sentence saying where the dev attacks come from.

    ``mix``: the synthetic methods and their shares (``synthetic_methods``, :func:`~.synthesis.parse_mix`);
    ``morph_methods``: what generated morphs combine two photos by; ``resample_p``: how often a
    training item of either class is resampled (``shared_resample_p``); ``flow_p``: how often a
    generated morph's faces are also aligned along their optical flow (``generated_flow_p``);
    ``match``: where synthetic attacks get their photo's statistics (``synthetic_match``).
    """
    dev_set, note = dev_attacks(dev, mode, seed, landmarks, mix, morph_methods, flow_p, match)
    if not made_sources(mode):
        return train, dev_set, note
    return (SyntheticTrainSet(train, mode, landmarks, match=match, mix=mix, morph_methods=morph_methods,
                              resample_p=resample_p, flow_p=flow_p), dev_set, note)
