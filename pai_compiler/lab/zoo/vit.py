"""Vision Transformers: a tiny ViT for tests and ViT-B/16.

Architecture (pre-norm, as in Dosovitskiy et al.): Conv2d patch embedding,
prepended learnable class token, learnable positional embedding, ``depth``
encoder blocks (LayerNorm -> multi-head self-attention -> residual,
LayerNorm -> MLP with GELU -> residual), final LayerNorm and a linear head on
the class token.

* :func:`tiny_vit` -- 32x32 input, patch 8, dim 64, depth 2, 4 heads
  (81,226 parameters for 10 classes).
* :func:`vit_b16` -- 224x224 input, patch 16, dim 768, depth 12, 12 heads
  (86,567,656 parameters for 1000 classes).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EncoderBlock", "VisionTransformer", "tiny_vit", "vit_b16"]


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: ``norm1``, ``attn``, ``norm2``, ``mlp``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with submodules ``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``, ``head``."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def tiny_vit(
    num_classes: int = 10,
    image_size: int = 32,
    patch: int = 8,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 128,
) -> VisionTransformer:
    """Tiny ViT for quick tests; input 3 x image_size x image_size (default 32).

    81,226 parameters with the defaults.
    """
    return VisionTransformer(
        num_classes=num_classes,
        image_size=image_size,
        patch=patch,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
    )


def vit_b16(num_classes: int = 1000) -> VisionTransformer:
    """ViT-B/16; input 3x224x224.

    86,567,656 parameters for 1000 classes.
    """
    return VisionTransformer(
        num_classes=num_classes, image_size=224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072
    )
