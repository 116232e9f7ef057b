"""ViT-S in plain PyTorch, in timm's ``VisionTransformer`` layout.

``vit_small_patch16_224``: dim 384, depth 12, 6 heads, MLP ratio 4, qkv bias, a CLS
token, learned absolute positions, pre-norm blocks, final LayerNorm, CLS pooling
(22,050,664 parameters with 3 input channels, 1000 classes, 224 px). Its blocks are
``multifusion.model.layers.Block`` (fused-qkv ``Attention``, LayerNorm eps 1e-6).

Patch size rule (``vit_patch_size``): 16 (timm's) when the image is at least 128 px,
otherwise ``image_size // 8`` so the token grid stays 8 x 8 (8 px patches at 64 px);
it must divide the image size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from multifusion.model.layers import Block


def vit_patch_size(image_size: int) -> int:
    """The patch size matched to ``image_size`` (16 at >= 128 px, else image_size // 8)."""
    patch = 16 if image_size >= 128 else max(1, image_size // 8)
    if image_size % patch:
        raise ValueError(
            f"vit_small: patch size {patch} does not divide data.image_size={image_size}; "
            "use an image size that is a multiple of 16 (>= 128) or of 8"
        )
    return patch


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly embedded: (B, C, H, W) -> (B, N, D), N = (H/p)(W/p)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """(B, in_chans, S, S) -> logits (B, num_classes), pooled on the CLS token."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_classes: int = 1000,
        in_chans: int = 1,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vit: patch size {patch_size} does not divide image size {image_size}")
        self.num_classes = num_classes
        self.num_features = dim
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, drop_path=rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]  # (B, D) CLS token
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def vit_small(num_classes: int, image_size: int, in_chans: int = 1, **kwargs) -> VisionTransformer:
    """ViT-S with the patch size matched to the image size (``vit_patch_size``)."""
    kwargs.setdefault("patch_size", vit_patch_size(image_size))
    return VisionTransformer(image_size, num_classes=num_classes, in_chans=in_chans, **kwargs)
