"""Mixture-of-experts gate fusing the sequence branch (h_CLS) and the graph branch (e_VN).

Each branch embedding x_e (B, C) goes through its own expert E_e (Linear); a softmax
gate over the concatenated branch embeddings weighs the experts per image:

    w = softmax(W_g [x_1, .., x_E])            # (B, E)
    h_fus = LN(sum_e w_e * E_e(x_e))           # (B, C)

The gate starts at zero (equal weights). With one branch (an ablation) there is nothing
to weigh: h_fus = LN(E_1(x_1)).
"""

from __future__ import annotations

import torch
from torch import nn

from multifusion.model.layers import ZeroInitLinear


class MoEGate(nn.Module):
    """[(B, C)] * num_experts -> h_fus (B, C)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError("MoEGate needs at least one expert (hnf.sequence_encoder or hnf.graph)")
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))
        self.gate = ZeroInitLinear(num_experts * dim, num_experts) if num_experts > 1 else None  # equal weights at start
        self.norm = nn.LayerNorm(dim)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        outs = torch.stack([expert(x) for expert, x in zip(self.experts, inputs)], dim=1)  # (B, E, C)
        if self.gate is None:
            weights = outs.new_ones(outs.shape[:2])  # (B, 1)
        else:
            weights = torch.softmax(self.gate(torch.cat(inputs, dim=-1)), dim=-1)  # (B, E)
        return self.norm((weights.unsqueeze(-1) * outs).sum(1))  # (B, C)
