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
    "adapt_mae",
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
    start = time.perf_counter()
    losses = _mae_loop(model, list(model.parameters()), images, settings, seed, progress, weight_decay=0.05)
    info = {"settings": settings, "seed": seed, "n_images": len(images), "losses": losses,
            "seconds": time.perf_counter() - start}
    return _save_folder(model, target, info)


def _mae_loop(model: torch.nn.Module, params: list[torch.nn.Parameter], images: torch.Tensor, settings: dict,
              seed: int, progress: bool, weight_decay: float) -> list[float]:
    """MAE training epochs (AdamW, one-cycle schedule, random flips); the mean loss of each epoch."""
    optimiser = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=weight_decay, betas=(0.9, 0.95))
    epochs = settings["epochs"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings["lr"], total_steps=epochs * -(-len(images) // settings["batch_size"]),
        pct_start=0.1,
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(images, batch_size=settings["batch_size"], shuffle=True, generator=generator)
    losses = []
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
    return losses


def _save_folder(model: torch.nn.Module, target: Path, info: dict, copy: tuple[Path, ...] = ()) -> Path:
    """``save_pretrained`` + ``pretrain.json`` (+ ``copy`` files) into ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        for path in copy:
            shutil.copyfile(path, tmp / path.name)
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
        if target.exists():  # another process finished first; its result is equivalent
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@torch.no_grad()
def _fixed_mask_loss(model: torch.nn.Module, images: torch.Tensor, seed: int, batch_size: int) -> float:
    """Masked-patch loss over ``images`` with masks fixed by ``seed``: comparable before and after."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    patches = model.config.num_patches if hasattr(model.config, "num_patches") else (
        (model.config.image_size // model.config.patch_size) ** 2)
    noise = torch.rand(len(images), patches, generator=generator)
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        total += model(pixel_values=batch, noise=noise[start:start + len(batch)]).loss.item() * len(batch)
    return total / len(images)


def adapt_mae(source: Path, images: torch.Tensor, settings: dict, target: Path, seed: int,
              lora: dict, progress: bool = True) -> Path:
    """Continue MAE pretraining of a ``vit_mae`` folder on ``images``: LoRA on the encoder, then merged.

    The encoder gets LoRA adapters (``lora``: ``targets``, ``r``, ``alpha``) and the decoder
    trains fully; afterwards the adapters are merged (``lora_vit.merge_lora``), so ``target``
    is an ordinary ViTMAE folder of the same architecture that ``train --backbone`` loads.
    Why LoRA rather than full: a domain-adaptation set is small (hundreds to thousands of
    faces) next to the 1.3 M ImageNet images the encoder learnt from, and low-rank updates
    move it less far from what it knows while needing optimiser state for a few percent of
    the weights; the decoder is discarded by the detector, so it may move freely.

    Args:
        source: The ``vit_mae`` checkpoint folder (e.g. a downloaded facebook/vit-mae-base).
        images: ``N x 3 x S x S`` bona fide training images, normalised as the folder says.
        settings: ``mask_ratio``, ``epochs``, ``lr``, ``batch_size``.
        target: Folder to create (atomically).
        seed: Seeds the adapters, the masks and the flips.
        lora: ``targets``, ``r``, ``alpha`` of the encoder's adapters.
        progress: Show a tqdm bar.

    Returns:
        ``target``, with ``pretrain.json`` holding the per-epoch losses and the masked-patch
        loss on the images with fixed masks before and after.

    Raises:
        BackboneError: If ``source`` is not a loadable ``vit_mae`` folder.
    """
    from transformers import ViTMAEForPreTraining

    from lora_vit import inject_lora, merge_lora

    try:
        model = ViTMAEForPreTraining.from_pretrained(source, local_files_only=True,
                                                     mask_ratio=settings["mask_ratio"])
    except (OSError, ValueError, RuntimeError) as err:
        raise BackboneError(f"could not load the vit_mae folder {str(source)!r} for pretraining: {err}") from None
    torch.manual_seed(seed)
    before = _fixed_mask_loss(model, images, seed, settings["batch_size"])
    inject_lora(model.vit, targets=lora["targets"], r=lora["r"], alpha=lora["alpha"], dropout=0.0)
    model.decoder.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    losses = _mae_loop(model, params, images, settings, seed, progress, weight_decay=0.0)
    merge_lora(model.vit)
    after = _fixed_mask_loss(model, images, seed, settings["batch_size"])
    info = {"source": str(source), "method": "LoRA on the encoder, merged; decoder trained fully", "lora": lora,
            "settings": settings, "seed": seed, "n_images": len(images), "losses": losses,
            "fixed_mask_loss": {"before": before, "after": after}, "seconds": time.perf_counter() - start}
    extra = tuple(p for p in (source / "preprocessor_config.json",) if p.is_file())
    return _save_folder(model, target, info, extra)


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the backbone's tensors, to check that a test run uses the trained-on base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()
