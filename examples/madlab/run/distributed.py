"""Running under ``torchrun``: process group, rank-0-only output, and evaluation over every rank's scores.

One process (no ``WORLD_SIZE`` > 1 and no process group) is the plain path: every helper here
then does nothing and the training code runs exactly as without this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Dist", "barrier", "current", "gather_by_index", "setup", "teardown"]


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world``; ``active`` when a process group is up."""

    rank: int = 0
    world: int = 1
    active: bool = False
    # One process uses the GPU when there is one; under torchrun, current() sets each rank's.
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, prints and shows progress bars."""
        return self.rank == 0


def current() -> Dist:
    """The process group this process is in, or the single-process default."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Dist(dist.get_rank(), dist.get_world_size(), True, device)


def setup() -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): nccl on CUDA, gloo on CPU.

    A group that is already up (e.g. made by a test harness) is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return current()


def teardown(made: bool) -> None:
    """Leave the group if :func:`setup` made it."""
    if made and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process): used before reading what rank 0 wrote."""
    if current().active:
        dist.barrier()


def gather_by_index(indices: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Every rank's ``values`` for dataset ``indices``, put back in dataset order (rows 0..n-1).

    ``DistributedSampler`` pads the last round with repeats of the first samples so that
    every rank gets as many; the first copy of each index is kept and the repeats dropped.

    Raises:
        RuntimeError: If some index in ``range(n)`` came from no rank.
    """
    parts: list = [None] * current().world
    dist.all_gather_object(parts, (np.asarray(indices, dtype=np.int64), np.asarray(values)))
    out = np.empty((n, *np.asarray(values).shape[1:]), dtype=np.asarray(values).dtype)
    seen = np.zeros(n, dtype=bool)
    for part_indices, part_values in parts:
        _, first = np.unique(part_indices, return_index=True)  # padding may repeat an index on one rank too
        keep = first[~seen[part_indices[first]]]
        out[part_indices[keep]] = part_values[keep]
        seen[part_indices[keep]] = True
    if not seen.all():
        raise RuntimeError(f"gathered scores miss {int((~seen).sum())} of {n} samples")
    return out
