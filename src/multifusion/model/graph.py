"""Dense, batched patch-graph operations in plain PyTorch (Vision GNN style).

A batch of B graphs over N nodes is a dense adjacency ``adj`` (B, N, N) with
``adj[b, i, j] = 1`` when node i aggregates from node j (edge j -> i). For patch graphs
(N up to a few hundred) this is the fastest form on CPU and GPU and needs no graph
library. The ViG baseline reuses ``knn_graph`` (its max-relative conv is its own
``MRConv2d``, in ``baselines/vig.py``):

    idx = knn_graph(x, k)                      # (B, N, k) neighbours by cosine similarity
    adj = add_virtual_node(knn_adjacency(idx))  # (B, N+1, N+1), node N linked to all
    h = ChebConv(C, C, K)(h, adj, laplacian_lambda_max(adj))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """k nearest neighbours of every node by cosine similarity, self excluded.

    x: (B, N, C) node features -> idx (B, N, k) long, neighbours sorted by similarity.
    k is clamped to N - 1 (a graph of N nodes has at most N - 1 other nodes).
    """
    B, N, _ = x.shape
    k = min(k, N - 1)
    if k < 1:
        return x.new_zeros((B, N, 0), dtype=torch.long)
    xn = F.normalize(x, dim=-1)
    sim = xn @ xn.transpose(1, 2)  # (B, N, N)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    return sim.topk(k, dim=-1).indices  # (B, N, k)


def knn_adjacency(idx: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Dense 0/1 adjacency from neighbour indices.

    idx: (B, N, k) -> adj (B, N, N) float with adj[b, i, idx[b, i, m]] = 1; symmetric=True
    adds every reverse edge (adj = max(adj, adj^T)). No self loops.
    """
    B, N, _ = idx.shape
    adj = torch.zeros(B, N, N, device=idx.device)
    adj.scatter_(2, idx, 1.0)
    if symmetric:
        adj = torch.maximum(adj, adj.transpose(1, 2))
    return adj


def add_virtual_node(adj: torch.Tensor) -> torch.Tensor:
    """Append one virtual node (index N) linked both ways to every node.

    adj: (B, N, N) -> (B, N+1, N+1); the virtual node has no self loop.
    """
    B, N, _ = adj.shape
    out = F.pad(adj, (0, 1, 0, 1))  # (B, N+1, N+1)
    out[:, N, :N] = 1.0
    out[:, :N, N] = 1.0
    return out


def normalized_adjacency(adj: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D the in-degrees clamped to >= 1 (as dgl.nn.ChebConv).

    adj: (B, N, N), adj[b, i, j] = edge j -> i -> (B, N, N).
    """
    d_inv_sqrt = adj.sum(-1).clamp(min=1).pow(-0.5)  # (B, N) in-degree of each node
    return d_inv_sqrt.unsqueeze(-1) * adj * d_inv_sqrt.unsqueeze(-2)


@torch.no_grad()
def laplacian_lambda_max(adj: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of the normalized Laplacian I - D^-1/2 A D^-1/2 of each graph.

    adj: (B, N, N) symmetric -> (B,). Same value as ``dgl.laplacian_lambda_max``.
    """
    N = adj.shape[-1]
    lap = torch.eye(N, device=adj.device) - normalized_adjacency(adj.float())
    return torch.linalg.eigvalsh(lap)[..., -1]


class ChebConv(nn.Module):
    """Chebyshev spectral graph convolution of order K, exactly as ``dgl.nn.ChebConv``.

    With the scaled Laplacian L~ = 2 L / lambda_max - I and L = I - D^-1/2 A D^-1/2:
    X_0 = X, X_1 = L~ X, X_k = 2 L~ X_{k-1} - X_{k-2}; out = Linear([X_0 .. X_{K-1}]).
    The weight layout matches DGL's (``linear``: (out, K * in)), so weights copy across.
    """

    def __init__(self, in_dim: int, out_dim: int, k: int, bias: bool = True) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"graph.cheb_k must be >= 1, got {k}; set graph.cheb_k in params.yaml")
        self.k = k
        self.linear = nn.Linear(k * in_dim, out_dim, bias=bias)

    def forward(
        self, x: torch.Tensor, adj: torch.Tensor, lambda_max: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """x (B, N, C_in), adj (B, N, N), lambda_max (B,) or a number (None: 2, DGL's default)
        -> (B, N, C_out)."""
        a_hat = normalized_adjacency(adj).to(x.dtype)  # (B, N, N)
        if lambda_max is None:
            lambda_max = 2.0
        if not torch.is_tensor(lambda_max):
            lambda_max = torch.full((x.shape[0],), float(lambda_max), device=x.device)
        re_norm = (2.0 / lambda_max).to(x.dtype).view(-1, 1, 1)  # (B, 1, 1)
        x0 = x
        terms = [x0]
        if self.k > 1:
            x1 = -re_norm * (a_hat @ x0) + x0 * (re_norm - 1)
            terms.append(x1)
            for _ in range(2, self.k):
                x2 = -2 * re_norm * (a_hat @ x1) + x1 * 2 * (re_norm - 1) - x0
                terms.append(x2)
                x0, x1 = x1, x2
        return self.linear(torch.cat(terms, dim=-1))  # (B, N, C_out)


class GraphBlock(nn.Module):
    """Pre-norm residual Chebyshev conv + GELU: h + drop(GELU(cheb(LN(h)))). (B, N, C)."""

    def __init__(self, dim: int, cheb_k: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = ChebConv(dim, dim, cheb_k)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, adj: torch.Tensor, lambda_max: torch.Tensor | float | None) -> torch.Tensor:
        return h + self.drop(F.gelu(self.conv(self.norm(h), adj, lambda_max)))


class PatchGraphEncoder(nn.Module):
    """kNN patch graph + virtual node, encoded by ``layers`` Chebyshev blocks.

    patches (B, N, C), virtual (B, C) -> e_VN (B, C): the virtual node's final embedding.
    Edges: k nearest neighbours by cosine similarity of the patch embeddings (made
    symmetric), plus the virtual node linked to every patch.
    lambda_max None: the exact largest eigenvalue of each graph's normalized Laplacian.
    """

    def __init__(self, dim: int, k: int, cheb_k: int, layers: int, dropout: float, lambda_max: float | None) -> None:
        super().__init__()
        self.k = k
        self.lambda_max = lambda_max
        self.blocks = nn.ModuleList(GraphBlock(dim, cheb_k, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def build_graph(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """patches (B, N, C) -> adjacency (B, N+1, N+1) with the virtual node last, lambda_max."""
        adj = add_virtual_node(knn_adjacency(knn_graph(patches, self.k)))
        lam = laplacian_lambda_max(adj) if self.lambda_max is None else self.lambda_max
        return adj, lam

    def forward(self, patches: torch.Tensor, virtual: torch.Tensor) -> torch.Tensor:
        adj, lam = self.build_graph(patches)
        h = torch.cat([patches, virtual.unsqueeze(1)], dim=1)  # (B, N+1, C)
        for block in self.blocks:
            h = block(h, adj, lam)
        return self.norm(h[:, -1])  # (B, C)
