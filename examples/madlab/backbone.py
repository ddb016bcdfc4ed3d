"""Backbones: the example's small ViT, its MAE pretraining and cache, and local HF checkpoints.

Classification always runs a plain ``transformers.ViTModel`` (no masking: every patch is
seen). MAE masking exists only inside :func:`pretrain_mae`, where a
``ViTMAEForPreTraining`` reconstructs the pixels of masked patches and its loss counts the
masked patches only. The pretrained encoder is saved as an ordinary HF ViTMAE checkpoint
folder, so the default and ``--backbone`` go through the same loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import MadlabError

__all__ = [
    "BackboneError",
    "backbone_fingerprint",
    "cache_root",
    "default_backbone_dir",
    "load_backbone",
    "pretrain_mae",
    "tiny_mae_config",
]

DEFAULT_IMAGE_SIZE = 32
CACHE_ENV = "LORA_VIT_CACHE"


class BackboneError(MadlabError):
    """A backbone that cannot be loaded; the message names the path and what was expected."""


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$LORA_VIT_CACHE``, else ``~/.cache/lora-vit``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "lora-vit"


def tiny_mae_config(image_size: int = DEFAULT_IMAGE_SIZE, mask_ratio: float = 0.75):
    """A ViT small enough to pretrain and fine-tune on 2 CPU cores in about a minute.

    4 x 4 patches of a 32 px image give 64 tokens; 4 blocks of width 96 with 4 heads.
    """
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=192,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        mask_ratio=mask_ratio,
        # Raw pixels: per-patch normalisation of 4x4 patches of upscaled 25 px crops mostly
        # amplifies noise (measured: the loss stayed at the predict-the-mean level).
        norm_pix_loss=False,
    )


def default_backbone_dir(images: torch.Tensor, settings: dict, root: Path) -> Path:
    """Cache folder for a tiny MAE trained on ``images`` with ``settings``: a hash of both."""
    digest = hashlib.sha256()
    # Quantise to 8 bits so the key does not depend on float rounding across platforms.
    digest.update(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return root / f"mae-vit-tiny-{digest.hexdigest()[:16]}"


def pretrain_mae(
    images: torch.Tensor, settings: dict, target: Path, seed: int, progress: bool = True
) -> Path:
    """Pretrain the tiny ViT as a masked autoencoder on ``images`` and save it to ``target``.

    Args:
        images: ``N x 3 x S x S`` bona fide training images, normalised to [-1, 1].
        settings: ``image_size``, ``mask_ratio``, ``epochs``, ``lr``, ``batch_size``.
        target: Folder to create (atomically: written beside it, then renamed).
        seed: Seeds the initialisation, the masks and the augmentation.
        progress: Show a tqdm bar.

    Returns:
        ``target``, an HF ViTMAE checkpoint folder plus ``pretrain.json`` (settings, losses).
    """
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(tiny_mae_config(settings["image_size"], settings["mask_ratio"]))
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.05, betas=(0.9, 0.95))
    epochs = settings["epochs"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings["lr"], total_steps=epochs * -(-len(images) // settings["batch_size"]),
        pct_start=0.1,
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(images, batch_size=settings["batch_size"], shuffle=True, generator=generator)
    losses = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(epochs), desc="MAE pretraining", disable=not progress, leave=False)
    for _ in bar:
        total, count = 0.0, 0
        for batch in loader:
            # Flips keep faces faces; MAE needs little else at this size.
            flip = torch.rand(batch.shape[0], generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = model(pixel_values=batch).loss  # MSE on the masked patches only
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += loss.item() * batch.shape[0]
            count += batch.shape[0]
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        info = {"settings": settings, "seed": seed, "n_images": len(images), "losses": losses,
                "seconds": time.perf_counter() - start}
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
        if target.exists():  # another process finished first; its result is equivalent
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_model_type(path: Path) -> str:
    if not path.exists():
        raise BackboneError(f"backbone folder {str(path)!r} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BackboneError(
            f"{str(path)!r} is not an HF transformers checkpoint folder (it needs config.json and"
            " model.safetensors or pytorch_model.bin), e.g. a downloaded facebook/vit-mae-large"
        )
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as err:
        raise BackboneError(f"{path / 'config.json'} is not valid JSON: {err}") from None
    if model_type not in ("vit", "vit_mae"):
        raise BackboneError(f"{str(path)!r} holds a {model_type!r} model; supported: 'vit' and 'vit_mae'")
    return model_type


def load_backbone(path: str | os.PathLike[str]):
    """Load a local ViT or ViTMAE checkpoint folder as a mask-free ``ViTModel``, offline.

    A ViTMAE encoder has the same weights as a ViT encoder; converting it to ``ViTModel``
    drops the random masking, which must never run at classification time.

    Raises:
        BackboneError: For a missing folder, an unsupported model type or unloadable weights.
    """
    from transformers import ViTConfig, ViTMAEModel, ViTModel

    path = Path(path)
    model_type = _read_model_type(path)
    try:
        if model_type == "vit":
            return ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        mae = ViTMAEModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise BackboneError(f"could not load the weights in {str(path)!r}: {err}") from None
    c = mae.config
    config = ViTConfig(
        image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
        hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias,
    )
    vit = ViTModel(config, add_pooling_layer=False)
    missing, unexpected = vit.load_state_dict(mae.state_dict(), strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"the ViTMAE encoder in {str(path)!r} does not map onto a ViT: missing {missing[:5]},"
            f" unexpected {unexpected[:5]}"
        )
    return vit


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the backbone's tensors, to check that a test run uses the trained-on base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()
