"""Images as the model sees them: decoded and resized once, kept in a bounded uint8 cache, normalised per backbone.

Decoding a JPEG and resizing it costs far more than a training step of a small model, so
every image is decoded and resized to the backbone's input size once, by DataLoader workers
in parallel, and kept as ``uint8`` (3 bytes per pixel, a quarter of float32). The cache is
bounded (``image_cache_mb``): images beyond it are decoded again whenever they are used,
by the training loader's workers. Normalisation (the backbone's own mean and std) and the
augmentation run on the cached pixels, so they cost almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..io.pixels import UnreadableImageError, load_pixels
from .samples import DataError, Sample

__all__ = ["ImageDataset", "decode", "make_loader", "normalise", "resize_pixels", "sample_pixels"]

MIB = 2**20


def resize_pixels(pixels: np.ndarray, size: int) -> torch.Tensor:
    """``3 x size x size`` uint8 from ``H x W x 3`` float pixels in [0, 1] (bilinear with
    antialiasing, then rounded): the one resize every command uses, so that ``train``, ``test``
    and ``predict`` feed the model the very same numbers for the same file."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.squeeze(0).clamp(0, 1) * 255).round().to(torch.uint8)


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``... x 3 x S x S`` -> float32, scaled to [0, 1] and normalised by the backbone's
    ``mean``/``std`` (each ``3 x 1 x 1``)."""
    return (pixels.float() / 255.0 - mean) / std


def sample_pixels(sample: Sample, size: int | None = None) -> np.ndarray:
    """``H x W x 3`` float pixels in [0, 1] of ``sample``: in memory, or read from its file. A sample
    whose face was found (``face_crop=align``, :mod:`.cropping`) gives its aligned ``size x size`` crop.

    Raises:
        DataError: If the file cannot be read any more.
    """
    if sample.face is not None and size:
        return sample.face.crop(size, lambda: sample_pixels(replace(sample, face=None)))
    if sample.image is not None:
        return sample.image
    try:
        return load_pixels(sample.path, size)[0]
    except UnreadableImageError as err:
        raise DataError(f"could not read {sample.path!r} (it was readable when scanned): {err.status}") from None


def decode(sample: Sample, size: int) -> torch.Tensor:
    """``3 x size x size`` uint8 pixels of ``sample`` (see :func:`resize_pixels`).

    Raises:
        DataError: If the file cannot be read any more.
    """
    return resize_pixels(sample_pixels(sample, size), size)


class _Decoded(Dataset):
    """The decode step alone, so a DataLoader can run it in worker processes."""

    def __init__(self, samples: Sequence[Sample], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode(self.samples[index], self.size)


class ImageDataset(Dataset):
    """Samples as normalised ``3 x size x size`` float tensors, with their label and index.

    Args:
        samples: The rows to serve.
        size: Square side the images are resized to (the backbone's input size).
        augment: Random horizontal flips and small shifts, for training only. They act
            identically on both classes, so they cannot create or hide morph cues.
        mean: Per-channel mean of the backbone's normalisation (pixels in [0, 1]).
        std: Per-channel std of the backbone's normalisation.
        cache_mb: Keep at most this many MiB of decoded uint8 images (0 = no cache). The
            first images that fit are decoded at construction; the rest on every use.
        num_workers: Processes that decode the cached images at construction.

    Shapes:
        ``dataset[i]``: ``(3 x size x size float32, scalar label, i)``.
    """

    def __init__(self, samples: list[Sample], size: int, augment: bool = False,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 cache_mb: float = 4096, num_workers: int = 0) -> None:
        self.samples = samples
        self.size = size
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        per_image = 3 * size * size
        self.cached = min(len(samples), int(cache_mb * MIB) // per_image)
        self._cache = torch.empty(self.cached, 3, size, size, dtype=torch.uint8)
        self._fill(num_workers)

    @property
    def fully_cached(self) -> bool:
        """Whether every image is in memory (then a loader needs no worker processes)."""
        return self.cached == len(self.samples)

    def _fill(self, num_workers: int) -> None:
        if not self.cached:
            return
        wanted = self.samples[: self.cached]
        # Images already in memory (the embedded set) decode faster than workers start.
        workers = 0 if all(s.image is not None for s in wanted) else num_workers
        loader = DataLoader(_Decoded(wanted, self.size), batch_size=32, num_workers=workers)
        start = 0
        for batch in loader:
            self._cache[start:start + len(batch)] = batch
            start += len(batch)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int) -> torch.Tensor:
        """The ``3 x size x size`` uint8 image, from the cache or decoded now."""
        return self._cache[index] if index < self.cached else decode(self.samples[index], self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = normalise(self.pixels(index), self.mean, self.std)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            shift = max(1, self.size // 16)
            dy, dx = torch.randint(-shift, shift + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        return x, torch.tensor(float(self.samples[index].label)), index


def make_loader(dataset: ImageDataset, batch_size: int, num_workers: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader that uses worker processes only when some images must be decoded on the fly.

    Reading cached uint8 tensors is cheaper than handing batches between processes, so a
    fully cached dataset is served by the main process (which also keeps runs with and
    without workers bit-identical).

    Workers are started afresh for every pass (never persistent): each pass then seeds them
    from ``generator`` (or torch's global generator) as it starts, so what they draw (the
    augmentation) follows from that generator's state alone, which a training checkpoint
    saves. Persistent workers draw their seeds once, at a process's first pass, so a resumed
    run's workers would draw other numbers than the uninterrupted run's. Starting them costs
    little beside decoding every image not in the cache, which is why there are workers.
    """
    workers = 0 if dataset.fully_cached else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, generator=generator, drop_last=drop_last, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
