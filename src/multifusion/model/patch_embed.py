"""Patch tokens at every HNF layer's patch size, with 2-D positional embeddings.

Patch sizes run coarse to fine (the "inverted pyramid"). ``hnf.stem``:
- ``pyramid``: a ResNet-style convolutional backbone (BatchNorm basic blocks,
  stages at strides 4, 8, 16, 32, widths ``hnf.stem_width`` x 1, 2, 4, 8) with a
  feature-pyramid top-down path. The layer of patch size p takes its tokens from the
  stride-p level, so each HNF layer sees its own receptive field (coarse tokens from deep
  stages), and the top-down path gives the fine levels the deep stages' semantics.
- ``graph`` (default): an isotropic Vision GNN trunk (``multifusion.model.graph_stem``): graph blocks
  on the finest patch grid at ``hnf.stem_width`` channels, each HNF layer reading the trunk at
  its own depth (coarse layers deeper), pooled to its grid.
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

from multifusion.core.config import STEMS  # the allowed hnf.stem values live with the params
from multifusion.model.baselines.resnet import BasicBlock
from multifusion.model.graph_stem import GraphStem
from multifusion.core.patch_grid import PYRAMID_STRIDES, derive_patch_sizes  # noqa: F401 -- torch-free: params.yaml is checked with it


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


class PyramidStem(nn.Module):
    """ResNet-18-style backbone with a feature-pyramid top-down path.

    x (B, 1, S, S) -> ({stride: (B, dim, S/stride, S/stride)} for the requested strides,
    the deepest stage's map (B, 8w, S/32, S/32)).
    Stem: 7x7/2 conv + 3x3/2 max-pool (stride 4), then stages of ``depths`` BasicBlocks at
    strides 4, 8, 16, 32 with widths w, 2w, 4w, 8w (w = 64: ResNet-18's trunk). The pyramid
    (Lin et al., FPN): P_32 = lat(C_32); P_s = lat(C_s) + upsample(P_2s) down to the finest
    requested stride; only the stages needed up to stride 32 are evaluated.
    """

    def __init__(self, dim: int, width: int, strides: list[int], depths: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.strides = sorted(set(strides), reverse=True)  # coarse to fine, unique
        self.finest = min(self.strides)
        self.conv1 = nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, c_in = [], width
        for i, depth in enumerate(depths):
            c_out, stride = width * 2**i, 1 if i == 0 else 2
            down = None if stride == 1 and c_in == c_out else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
            blocks = [BasicBlock(c_in, c_out, stride, down)] + [BasicBlock(c_out, c_out) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)  # strides 4, 8, 16, 32
        self.stage_strides = [4 * 2**i for i in range(len(depths))]
        self.lateral = nn.ModuleDict(
            {str(s): nn.Conv2d(width * 2**i, dim, 1) for i, s in enumerate(self.stage_strides) if s >= self.finest}
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                m.zero_init_last()  # every residual branch starts as the identity (timm's default)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, w, S/4, S/4)
        features = {}
        for stride, stage in zip(self.stage_strides, self.stages):
            x = stage(x)  # (B, w * stride/4, S/stride, S/stride)
            features[stride] = x
        levels, top = {}, None
        for stride in sorted(self.lateral, key=int, reverse=True):  # coarse to fine
            lat = self.lateral[stride](features[int(stride)])  # (B, dim, S/s, S/s)
            top = lat if top is None else lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            levels[int(stride)] = top
        return {s: levels[s] for s in self.strides}, x  # x: the deepest stage (B, 8w, S/32, S/32)


class HierarchicalPatchEmbed(nn.Module):
    """Image (B, 1, S, S) -> one token sequence per layer: [(B, (S/p_l)^2, C)] with 2-D positions."""

    def __init__(
        self, image_size: int, patch_sizes: list[int], dim: int, stem: str, stem_width: int, stem_depth: int
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"hnf.stem must be one of {STEMS}, got {stem!r}; fix params.yaml")
        self.stem_kind = stem
        self.patch_sizes = list(patch_sizes)
        self.grids = [image_size // p for p in patch_sizes]
        self.global_dim = {"pyramid": 8 * stem_width, "graph": stem_width, "conv": dim}.get(stem)  # pooled map's width; None: linear
        if stem == "graph":
            self.stem = GraphStem(image_size, self.patch_sizes, stem_width, stem_depth)
            self.proj = nn.ModuleList(nn.Linear(stem_width, dim) for _ in patch_sizes)
        elif stem == "pyramid":
            self.stem = PyramidStem(dim, stem_width, self.patch_sizes)
            self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in patch_sizes)
        elif stem == "conv":
            self.stem = ConvStem(dim, min(patch_sizes))
            self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in patch_sizes)
        else:
            self.proj = nn.ModuleList(nn.Conv2d(1, dim, p, stride=p) for p in patch_sizes)
        self.pos = nn.ModuleList(PositionalEmbedding2d(g, dim) for g in self.grids)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """x (B, 1, S, S) -> ([tokens (B, g_l*g_l, C) per layer], the stem's globally pooled deepest
        map (B, global_dim), or None for the linear stem)."""
        tokens, pooled = [], None
        if self.stem_kind in ("pyramid", "graph"):
            # pyramid: {stride: (B, C, S/stride, S/stride)}, deepest stage (B, 8w, S/32, S/32)
            # graph: {patch size: (B, w, S/p, S/p)}, the trunk's last map (B, w, g, g)
            levels, deepest = self.stem(x)
            pooled = deepest.mean(dim=(2, 3))  # (B, global_dim)
            for p, proj, pos in zip(self.patch_sizes, self.proj, self.pos):
                tokens.append(pos(proj(levels[p].flatten(2).transpose(1, 2))))  # (B, g*g, C)
        elif self.stem_kind == "conv":
            fmap = self.stem(x)  # (B, C, g_fine, g_fine)
            pooled = fmap.mean(dim=(2, 3))  # (B, C)
            for grid, proj, pos in zip(self.grids, self.proj, self.pos):
                grid_map = fmap if fmap.shape[-1] == grid else F.adaptive_avg_pool2d(fmap, grid)  # (B, C, g, g)
                tokens.append(pos(proj(grid_map.flatten(2).transpose(1, 2))))  # (B, g*g, C)
        else:
            for proj, pos in zip(self.proj, self.pos):
                tokens.append(pos(proj(x).flatten(2).transpose(1, 2)))  # (B, g*g, C)
        return tokens, pooled
