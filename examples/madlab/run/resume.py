"""Training checkpoints for ``train --resume``: one safetensors file per run, rewritten atomically each epoch.

The file holds every tensor (trainable parameters, the best epoch's copy, the optimiser's
moment tensors, the RNG states as byte tensors) and, in its JSON metadata, every scalar
(epoch, history, best-so-far, early-stopping counter, scheduler and optimiser settings).
Nothing is pickled, so a checkpoint from an untrusted place cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..io.files import write_atomically
from ..model.checkpoint import CheckpointError

__all__ = ["STATE_FILE", "TrainState", "read_state", "write_state"]

STATE_FILE = "train_state.safetensors"
_FORMAT = "madlab-train-state-v1"


class TrainState(dict):
    """What resuming needs, as plain fields: ``epoch`` (epochs done), ``history``, ``best``,
    ``since_best``, ``params``, ``best_state``, ``optimizer``, ``scheduler``, ``rng``, ``run``."""


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser state dict -> (tensors by ``index.key``, everything else as JSON-ready values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    numpy_state = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.loader": generator.get_state(),
        "rng.numpy_keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout masks on a CUDA device come from that device's generator, not the CPU one.
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _numpy_rng_meta() -> list[Any]:
    kind, _, pos, has_gauss, cached = np.random.get_state()
    return [kind, int(pos), int(has_gauss), float(cached)]


def write_state(path: Path, state: TrainState, generator: torch.Generator) -> None:
    """Write ``state`` plus the current RNG states to ``path`` atomically."""
    tensors = {f"param.{k}": v.detach().cpu().contiguous().clone() for k, v in state["params"].items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous().clone() for k, v in state["best_state"].items()})
    optim_tensors, optim_meta = _flatten_optimizer(state["optimizer"])
    tensors.update(optim_tensors)
    tensors.update(_rng_tensors(generator))
    meta = {
        "format": _FORMAT,
        "epoch": state["epoch"],
        "history": state["history"],
        "best": state["best"],
        "since_best": state["since_best"],
        "scheduler": state["scheduler"],
        "optimizer": optim_meta,
        "numpy_rng": _numpy_rng_meta(),
        "run": state["run"],
    }
    header = {"madlab_train_state": json.dumps(meta, allow_nan=True)}
    write_atomically(path, safetensors_bytes(tensors, metadata=header))


def read_state(path: Path) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Read a checkpoint; returns the state and the RNG tensors (apply with :func:`restore_rng`).

    Raises:
        CheckpointError: If the file is missing, unreadable or not a training checkpoint.
    """
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {str(path)!r} to resume from; run train without --resume")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = json.loads(header["madlab_train_state"])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable training checkpoint: {err}") from None
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{str(path)!r} has format {meta.get('format')!r}, expected {_FORMAT!r}")
    state = TrainState(
        epoch=int(meta["epoch"]),
        history=meta["history"],
        best=meta["best"],
        since_best=int(meta["since_best"]),
        scheduler=meta["scheduler"],
        run=meta["run"],
        params={k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")},
        best_state={k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")},
        optimizer=_unflatten_optimizer(tensors, meta["optimizer"]),
        numpy_rng=meta["numpy_rng"],
    )
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, rng


def restore_rng(rng: dict[str, torch.Tensor], numpy_meta: list[Any], generator: torch.Generator) -> None:
    """Put the torch (CPU and, if it was in use, the current CUDA device's), DataLoader and numpy RNGs
    back where the checkpoint left them."""
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    generator.set_state(rng["rng.loader"])
    kind, pos, has_gauss, cached = numpy_meta
    np.random.set_state((kind, rng["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
