"""Transformer layers shared by MultiFusion and the baselines (timm's ``layers`` role).

- ``Attention``: multi-head self-attention with one fused qkv projection (timm's
  ``Attention`` layout: ``qkv``, ``proj``): the ViT baseline.
- ``CrossAttention``: multi-head attention with a query projection ``q`` and a key/value
  projection ``kv``, so the keys may come from another sequence (``context``); without
  one it is self-attention. The ODE vector field, the transformer sequence encoder and
  the cross-modal head.
- ``Mlp`` (Linear -> GELU -> Linear), ``DropPath`` (stochastic depth) and the pre-norm
  ``Block`` built from them.
- ``ZeroInitLinear``: a linear gate that starts (and resets) at zero weight and bias.

The parameter names and the order in which parameters are created (so the random draws
of their initialisation) are those of the modules these replace: saved models load and
seeded runs initialise as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_heads(dim: int, heads: int) -> None:
    if dim % heads:
        raise ValueError(f"attention width {dim} is not divisible by {heads} heads; change the width (hnf.dim) or the heads")


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv projection: x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, C/h)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, h, N, C/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when None).

    x (B, N, C), context (B, M, C) -> (B, N, C).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def attention_weights(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The softmax weights of ``forward`` (no dropout): x (B, N, C), context (B, M, C) -> (B, h, N, M)."""
        B, N, C = x.shape
        M, h = context.shape[1], self.heads
        q = self.q(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        k = self.kv(context).view(B, M, 2, h, C // h)[:, :, 0].transpose(1, 2)  # (B, h, M, d)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // h), dim=-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, C = x.shape
        M, h = context.shape[1], self.heads
        q = self.q(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(context).view(B, M, 2, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, M, d) each
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout. (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p. (B, ...) -> (B, ...)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer encoder layer. (B, N, C) -> (B, N, C).

    x = x + drop_path(dropout(attn(norm1(x)))); x = x + drop_path(mlp(norm2(x))).
    ``attn_layer`` is ``Attention`` (fused qkv, timm's ViT) or ``CrossAttention`` (q + kv).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        attn_layer: type[nn.Module] = Attention,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn_layer(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.drop(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ZeroInitLinear(nn.Linear):
    """A linear gate that starts neutral: weight and bias zero, at construction and on
    ``reset_parameters``. nn.Linear's own random init is drawn first and overwritten, so
    the global RNG advances exactly as for any nn.Linear (the modules created after a gate
    initialise as they always have)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
