"""Optimisation pieces shared by every training loop (the image models' ``train`` and the
text LM's ``pretrain_lm``): AdamW's parameter groups, the LR schedules (a linear warm-up,
then cosine or linear decay) and one optimizer step.

    optimizer = adamw(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    for ...:
        optimizer_step(loss, optimizer, scheduler, model.parameters(), cfg.train.grad_clip)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from multifusion.core.config import TrainConfig

LRFactor = Callable[[int], float]  # optimizer step (0-based) -> multiplier of the peak lr


def adamw(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices/kernels only (not biases, norms, tokens)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr)


def _after_warmup(warmup_steps: int, decay: LRFactor) -> LRFactor:
    """Linear warm-up to 1 over the first ``warmup_steps`` steps, then ``decay(step)``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(step)

    return factor


def warmup_cosine(warmup_steps: int, total_steps: int) -> LRFactor:
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps`` (and 0 after)."""
    span = max(1, total_steps - warmup_steps)
    return _after_warmup(warmup_steps, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span))))


def warmup_linear(warmup_steps: int, total_steps: int) -> LRFactor:
    """Linear warm-up to 1, then linear decay to 0 at ``total_steps`` (and 0 after)."""
    span = max(1, total_steps - warmup_steps)
    return _after_warmup(warmup_steps, lambda step: max(0.0, (total_steps - step) / span))


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: Iterable[nn.Parameter],
    grad_clip: float,
) -> None:
    """One update on ``loss`` (a scalar): clear the old gradients, backpropagate, clip the
    global gradient norm of ``parameters`` to ``grad_clip`` (0 = off), step the optimizer,
    then the LR schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    scheduler.step()
