"""Small models of the three families lora-vit targets, built without any download.

- `TimmStyleViT`: timm's layout (fused ``attn.qkv``, ``attn.proj``, ``mlp.fc1``/``mlp.fc2``,
  ``head``), written here so the tests need neither timm nor torchvision.
- `HF4StyleViT`: HF transformers 4.x ViT naming (``encoder.layer.N.attention.attention.query``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``). The installed
  transformers (5.x) uses the newer ``q_proj``/``o_proj`` names, so the 4.x scheme is
  reproduced here module for module.
- `PlainNet`: a user's own module with its own names.
- `hf_vit` / `hf_vit_mae`: real transformers models from a tiny config.
- `randomise`: seeded non-zero values for everything an adapter trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_vit import lora_state_dict


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.num_patches = (image_size // patch) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmStyleViT(nn.Module):
    def __init__(
        self, image_size: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 4,
        num_classes: int = 3,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class _HF4SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.transpose(1, 2).reshape(b, n, c)


class _Dense(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)


class _HF4Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _HF4SelfAttention(dim, heads)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class _HF4Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim)
        self.attention = _HF4Attention(dim, heads)
        self.layernorm_after = nn.LayerNorm(dim)
        self.intermediate = _Dense(dim, 4 * dim)
        self.output = _Dense(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _HF4Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_HF4Layer(dim, heads) for _ in range(depth)])


class HF4StyleViT(nn.Module):
    """Token-in, pooled-out encoder with HF transformers 4.x ViT module names."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.encoder = _HF4Encoder(dim, heads, depth)
        self.layernorm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            x = layer(x)
        return self.classifier(self.layernorm(x)[:, 0])


class PlainNet(nn.Module):
    """A user's own model with names no convention knows."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 24)
        self.mixer = nn.ModuleDict({"left": nn.Linear(24, 24), "right": nn.Linear(24, 24, bias=False)})
        self.readout = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = self.mixer["left"](h) * torch.sigmoid(self.mixer["right"](h))
        return self.readout(h)


def _tiny_config(cls: type) -> object:
    return cls(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_channels=3,
    )


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(_tiny_config(ViTConfig), add_pooling_layer=False).eval()


def hf_vit_mae() -> nn.Module:
    from transformers import ViTMAEConfig, ViTMAEModel

    config = _tiny_config(ViTMAEConfig)
    config.mask_ratio = 0.0  # classification sees every patch; masking is a pretraining tool
    return ViTMAEModel(config).eval()


def randomise(model: nn.Module, adapter: str | None = None, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Add ``scale`` times seeded standard-normal noise to every tensor ``adapter`` trains (its
    factors and, where it has them, its own modules); returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in lora_state_dict(model, adapter=adapter).values():
            value.add_(scale * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    return model
