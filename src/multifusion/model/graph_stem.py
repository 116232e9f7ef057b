"""The graph stem (``hnf.stem: graph``): an isotropic Vision GNN trunk as HNF's patch embedding.

x (B, 1, S, S) -> conv stem to stride s (the finest patch size) -> + 2-D positions
-> ``depth`` (Grapher, FFN) blocks on the (S/s) x (S/s) patch grid at ``width`` channels
(Han et al. 2022; ViG-Ti is depth 12, width 192; the default is 6 of its blocks at 192). The graph blocks re-link every patch to
its nearest patches in feature space at every block, so the trunk is itself a stack of
patch-graph layers; its Grapher / FFN are the ViG baseline's own blocks.

The hierarchy: the HNF layer of patch size p (coarse to fine, index i of L) reads the
trunk's state after block ceil(depth * (L - i) / L), average-pooled to the S/p grid. Coarse
layers read deep states (large receptive fields, few tokens), fine layers earlier ones
(small receptive fields, many tokens): with L = 3 and depth 6, blocks 6, 4 and 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from multifusion.model.baselines.vig import NEIGHBOURS, Stem, graph_blocks


def tap_blocks(depth: int, layers: int) -> list[int]:
    """The trunk block (1-based) whose output each HNF layer reads, coarse to fine:
    tap_blocks(12, 3) == [12, 8, 4]; tap_blocks(12, 1) == [12]."""
    return [math.ceil(depth * (layers - i) / layers) for i in range(layers)]


class GraphStem(nn.Module):
    """Isotropic ViG trunk tapped at several depths.

    x (B, 1, S, S) -> ({patch size p: (B, width, S/p, S/p)}, the trunk's last map (B, width, g, g)),
    g = S / min(patch_sizes).
    """

    def __init__(self, image_size: int, patch_sizes: list[int], width: int, depth: int) -> None:
        super().__init__()
        self.patch_sizes = list(patch_sizes)  # coarse to fine
        stride = min(patch_sizes)
        self.grid = image_size // stride
        self.stem = Stem(1, width, stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, width, self.grid, self.grid))
        # the reference's neighbours (k growing to 2k over depth), fewer on grids too small for 2k
        k = max(1, min(NEIGHBOURS, self.grid * self.grid // 2))
        layers = graph_blocks(width, depth, self.grid, k)  # [Grapher_1, FFN_1, ...]
        self.blocks = nn.ModuleList(nn.Sequential(layers[i], layers[i + 1]) for i in range(0, len(layers), 2))
        self.taps = dict(zip(self.patch_sizes, tap_blocks(depth, len(patch_sizes))))  # {p: block}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the ViG reference's init
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        h = self.stem(x) + self.pos_embed  # (B, W, g, g)
        maps = {}
        for number, block in enumerate(self.blocks, start=1):
            h = block(h)  # (B, W, g, g)
            for p in (p for p, tap in self.taps.items() if tap == number):
                grid = self.grid * min(self.patch_sizes) // p
                maps[p] = h if grid == self.grid else F.adaptive_avg_pool2d(h, grid)  # (B, W, S/p, S/p)
        return maps, h
