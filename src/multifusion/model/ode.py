"""Sequence encoders for the patch tokens: a bidirectional Neural ODE, or a transformer.

The ODE's vector field mixes patches with pre-norm multi-head attention + an MLP. The
token state is integrated forward in time over [0, t1] with one field and backward from
t1 to 0 with a second field (reversed time); a learned per-channel gate joins the two.
Solvers come from torchdiffeq: fixed-step rk4/euler (``hnf.ode.steps`` steps) by
default, dopri5 (adaptive, rtol/atol) and the adjoint method as options.
"""

from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from multifusion.core.config import SEQUENCE_ENCODERS, SOLVERS, HNFConfig, ODEConfig  # choices live with the params
from multifusion.model.layers import Block, CrossAttention, Mlp, ZeroInitLinear


class VectorField(nn.Module):
    """dz/dt = f(t, z): attention mixes the patches, an MLP transforms each one.

    a = Attn(LN(z + t w)); f = gamma * (a + MLP(LN(z + a))). z (B, N, C) -> (B, N, C).
    gamma is a learned per-channel scale started small (layer scale), so the flow starts
    close to the identity map and the solver sees a gentle field early in training.
    No dropout inside: adaptive solvers need a deterministic field.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.time = nn.Parameter(torch.zeros(dim))  # time embedding direction
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(z + t * self.time))
        return self.gamma * (a + self.mlp(self.norm2(z + a)))


class BidirectionalODE(nn.Module):
    """Forward and backward Neural ODE over the token sequence, joined by a learned gate.

    z_fwd = z(t1) of dz/dt = f_fwd(t, z), z(0) = x, integrated over [0, t1];
    z_bwd = z(0) of dz/dt = f_bwd(t, z), z(t1) = x, integrated from t1 back to 0;
    g = sigmoid(W [z_fwd, z_bwd]); out = LN(g * z_fwd + (1 - g) * z_bwd).
    x (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, heads: int, ode: ODEConfig, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if ode.solver not in SOLVERS:
            raise ValueError(f"hnf.ode.solver must be one of {SOLVERS}, got {ode.solver!r}; fix params.yaml")
        if ode.steps < 1 or ode.t1 <= 0:
            raise ValueError("hnf.ode.steps must be >= 1 and hnf.ode.t1 > 0; fix params.yaml")
        self.cfg = ode
        self.forward_field = VectorField(dim, heads, mlp_ratio)
        self.backward_field = VectorField(dim, heads, mlp_ratio)
        self.gate = ZeroInitLinear(2 * dim, dim)  # starts at g = 1/2: the mean of both directions
        self.norm = nn.LayerNorm(dim)
        if ode.solver == "euler" and ode.steps == 1:
            # one Euler step evaluates the forward field at t = 0 only, where its time term t * w
            # vanishes: frozen, so that no parameter sits in the optimizer without a gradient
            self.forward_field.time.requires_grad_(False)

    def _integrate(self, field: VectorField, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        cfg = self.cfg
        t = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        if cfg.solver == "dopri5":
            kwargs = dict(method="dopri5", rtol=cfg.rtol, atol=cfg.atol)
        else:
            kwargs = dict(method=cfg.solver, options=dict(step_size=cfg.t1 / cfg.steps))
        solve = odeint_adjoint if cfg.adjoint else odeint
        return solve(field, x, t, **kwargs)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_fwd = self._integrate(self.forward_field, x, 0.0, self.cfg.t1)  # (B, N, C)
        z_bwd = self._integrate(self.backward_field, x, self.cfg.t1, 0.0)  # (B, N, C)
        g = torch.sigmoid(self.gate(torch.cat([z_fwd, z_bwd], dim=-1)))
        return self.norm(g * z_fwd + (1 - g) * z_bwd)


class TransformerEncoder(nn.Module):
    """``depth`` standard pre-norm encoder layers + a final LayerNorm. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, depth: int, dropout: float, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio, dropout, eps=1e-5, attn_layer=CrossAttention) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def build_sequence_encoder(hnf: HNFConfig) -> nn.Module:
    """hnf.sequence_encoder -> module. 'transformer' has two layers: as many (and as large)
    as the ODE's two vector fields; 'none' passes the embedded tokens through (LayerNorm)."""
    if hnf.sequence_encoder == "ode":
        return BidirectionalODE(hnf.dim, hnf.heads, hnf.ode)
    if hnf.sequence_encoder == "transformer":
        return TransformerEncoder(hnf.dim, hnf.heads, depth=2, dropout=hnf.dropout)
    if hnf.sequence_encoder == "none":
        return nn.LayerNorm(hnf.dim)
    raise ValueError(
        f"hnf.sequence_encoder must be one of {SEQUENCE_ENCODERS}, got {hnf.sequence_encoder!r}; fix params.yaml"
    )
