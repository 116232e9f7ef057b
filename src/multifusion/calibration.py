"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits.

Fitted on the validation split by minimising the negative log-likelihood over log T
(so T stays positive) with L-BFGS. Dividing by T never changes the argmax, so accuracy
is untouched; only the confidence is recalibrated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def nll(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under softmax(logits (N, C) / T)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising NLL(softmax(logits / T), labels); logits (N, C), labels (N,).

    Returns 1.0 for an empty set (nothing to fit).
    """
    logits = torch.as_tensor(logits, dtype=torch.float64).detach()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = math.exp(float(log_t.detach().clamp(-5.0, 5.0)))   # T in [e^-5, e^5]
    # L-BFGS cannot do worse than its start unless it diverged; keep T = 1 in that case.
    if not math.isfinite(temperature) or nll(logits, labels, temperature) > nll(logits, labels, 1.0):
        return 1.0
    return temperature
