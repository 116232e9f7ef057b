"""Swin-T in plain PyTorch, in timm's ``SwinTransformer`` layout.

``swin_tiny_patch4_window7_224``: 4x4 patch embedding (+LayerNorm), embed dim 96,
depths (2, 2, 6, 2), heads (3, 6, 12, 24), window attention with a learned relative
position bias, every second block shifted by half a window, patch merging between
stages, final LayerNorm and average pooling (28,288,354 parameters with 3 input
channels, 1000 classes, 224 px).

Window rule (``swin_window_size``): the largest w <= 7 such that every stage's token
grid (S/4, S/8, S/16, S/32) is either a multiple of w or at most w; a stage whose grid
is at most w uses one window covering the whole grid, unshifted (Swin's own rule).
224 px -> 7 (grids 56/28/14/7); 128 px -> 4 (32/16/8/4); 64 px -> 4 (16/8/4/2, the last
stage one 2x2 window).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from multifusion.model.layers import DropPath, Mlp


def swin_window_size(image_size: int, patch_size: int = 4, max_window: int = 7) -> int:
    """The window matched to ``image_size`` so every stage's grid divides (see module doc)."""
    if image_size % (patch_size * 8):
        raise ValueError(
            f"swin_tiny: data.image_size={image_size} must be a multiple of {patch_size * 8} "
            "(4x4 patches, then three 2x2 patch mergings)"
        )
    grids = [image_size // patch_size // 2**i for i in range(4)]
    for w in range(max_window, 0, -1):
        if all(g % w == 0 or g <= w for g in grids):
            return w
    raise AssertionError("unreachable: w = 1 always divides")


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """(B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(w: int) -> torch.Tensor:
    """(w*w, w*w) index into the ((2w-1)^2, heads) bias table for every token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w*w)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (w*w, w*w, 2) in [0, 2w-2]
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head attention inside each window, plus relative position bias: (B*nW, w*w, C)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (Bw, h, N, C/h)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, h)
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:  # (nW, N, N) additive, -100 across shifted-window seams
            nW = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask[None, :, None]).expand(Bw // nW, -1, -1, -1, -1)
            bias = bias.reshape(Bw, self.heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (Bw, h, N, C/h)
        return self.proj(x.transpose(1, 2).reshape(Bw, N, C))


def shifted_window_mask(H: int, W: int, w: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask: 0 within a region, -100 between regions after the roll."""
    img = torch.zeros(1, H, W, 1)
    region = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = region
            region += 1
    ids = window_partition(img, w).squeeze(-1)  # (nW, w*w)
    diff = ids[:, None, :] - ids[:, :, None]
    return diff.ne(0).float() * -100.0


class SwinBlock(nn.Module):
    """(Shifted) window attention + MLP, pre-norm residuals: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, drop_path: float) -> None:
        super().__init__()
        if resolution <= window:  # one window covers the grid: no shift (Swin's rule)
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask)  # (B*nW, w*w, C)
        y = window_reverse(y, self.window, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated and projected: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(
        self, dim: int, out_dim: int, resolution: int, depth: int, heads: int, window: int, downsample: bool, drop_path: list[float]
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[SwinBlock(out_dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, drop_path[i]) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinTransformer(nn.Module):
    """(B, in_chans, S, S) -> logits (B, num_classes)."""

    def __init__(
        self,
        image_size: int,
        num_classes: int = 1000,
        in_chans: int = 1,
        window: int | None = None,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        heads: tuple[int, ...] = (3, 6, 12, 24),
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        window = window or swin_window_size(image_size, patch_size)
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, dim, resolution, start = [], embed_dim, image_size // patch_size, 0
        for i, (depth, h) in enumerate(zip(depths, heads)):
            out_dim = embed_dim * 2**i
            if i > 0:
                resolution //= 2
            stages.append(SwinStage(dim, out_dim, resolution, depth, h, window, i > 0, rates[start : start + depth]))
            dim, start = out_dim, start + depth
        self.layers = nn.Sequential(*stages)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # (B, S/4, S/4, 96)
        return self.norm(self.layers(x))  # (B, S/32, S/32, 768)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))  # (B, 768)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def swin_tiny(num_classes: int, image_size: int, in_chans: int = 1, **kwargs) -> SwinTransformer:
    return SwinTransformer(image_size, num_classes=num_classes, in_chans=in_chans, **kwargs)
