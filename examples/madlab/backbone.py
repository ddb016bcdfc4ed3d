"""Backbones: the example's small ViT, its MAE pretraining and cache (loading lives in ``families``).

Classification of a ViT or ViTMAE folder always runs a plain ``transformers.ViTModel`` (no
masking: every patch is seen). MAE masking exists only inside :func:`pretrain_mae`, where a
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

from .families import BackboneError, load_backbone

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


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the backbone's tensors, to check that a test run uses the trained-on base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()
