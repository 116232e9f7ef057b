"""Patch tokens at every HNF layer's patch size, with 2-D positional embeddings.

Patch sizes run coarse to fine (the "inverted pyramid"). ``hnf.stem``:
- ``conv``: one shared residual convolutional stem (stride-2 ResNet blocks) down to a feature map at
  the finest patch grid, average-pooled to each coarser grid, then a per-layer linear
  projection. The convolutions give the inductive bias needed to learn from ~1k images.
- ``linear``: plain patchify + linear per layer (a ViT patch embedding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from multifusion.config import STEMS  # the allowed hnf.stem values live with the params
from multifusion.patch_grid import PYRAMID_STRIDES, derive_patch_sizes  # noqa: F401 -- torch-free: params.yaml is checked with it


class PositionalEmbedding2d(nn.Module):
    """Learned 2-D positions: row embedding + column embedding. (B, g*g, C) -> same."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.zeros(grid, 1, dim))
        self.cols = nn.Parameter(torch.zeros(1, grid, dim))
        nn.init.trunc_normal_(self.rows, std=0.02)
        nn.init.trunc_normal_(self.cols, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.rows + self.cols).flatten(0, 1)  # (g*g, C) broadcast over B


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """ResNet basic block with GroupNorm (batch-independent): two 3x3 convs + shortcut.

    (B, c_in, H, W) -> (B, c_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ConvStem(nn.Module):
    """Stride-``stride`` convolutional stem: 1 x S x S -> dim x (S/stride) x (S/stride).

    A 3x3 conv at full resolution, then one stride-2 residual block per halving (width
    doubling up to ``dim``), a kernel=stride conv for any odd remainder, and a 1x1
    projection to ``dim``. The residual blocks give the patch tokens the locality bias
    that transformers trained from scratch on ~1k micrographs lack.
    """

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        channels = max(dim // 4, 8)
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1, bias=False), _norm(channels), nn.GELU()]
        c_in, remaining = channels, stride
        while remaining % 2 == 0:
            c_out = min(c_in * 2, dim)
            layers.append(ResidualBlock(c_in, c_out, stride=2))
            c_in, remaining = c_out, remaining // 2
        if remaining > 1:
            layers += [nn.Conv2d(c_in, c_in, remaining, stride=remaining, bias=False), _norm(c_in), nn.GELU()]
        layers.append(nn.Conv2d(c_in, dim, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class HierarchicalPatchEmbed(nn.Module):
    """Image (B, 1, S, S) -> one token sequence per layer: [(B, (S/p_l)^2, C)] with 2-D positions."""

    def __init__(self, image_size: int, patch_sizes: list[int], dim: int, stem: str) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"hnf.stem must be one of {STEMS}, got {stem!r}; fix params.yaml")
        self.stem_kind = stem
        self.grids = [image_size // p for p in patch_sizes]
        if stem == "conv":
            self.stem = ConvStem(dim, min(patch_sizes))
            self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in patch_sizes)
        else:
            self.proj = nn.ModuleList(nn.Conv2d(1, dim, p, stride=p) for p in patch_sizes)
        self.pos = nn.ModuleList(PositionalEmbedding2d(g, dim) for g in self.grids)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = []
        if self.stem_kind == "conv":
            fmap = self.stem(x)  # (B, C, g_fine, g_fine)
            for grid, proj, pos in zip(self.grids, self.proj, self.pos):
                pooled = fmap if fmap.shape[-1] == grid else F.adaptive_avg_pool2d(fmap, grid)  # (B, C, g, g)
                tokens.append(pos(proj(pooled.flatten(2).transpose(1, 2))))  # (B, g*g, C)
        else:
            for proj, pos in zip(self.proj, self.pos):
                tokens.append(pos(proj(x).flatten(2).transpose(1, 2)))  # (B, g*g, C)
        return tokens
