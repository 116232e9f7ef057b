"""Baselines for the comparison, re-implemented in plain PyTorch after timm's definitions
(timm needs torchvision, whose PyPI wheels cannot import beside CPU torch here).

    model = build_baseline("resnet18", num_classes=10, image_size=64)
    logits = model(x)  # x (B, 1, S, S) -> (B, num_classes)

All take one grey input channel and start from scratch; every model follows timm's
``forward_features`` / ``forward_head`` pattern.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from multifusion.model.baselines.resnet import resnet18, resnet50
from multifusion.model.baselines.swin import swin_tiny, swin_window_size
from multifusion.model.baselines.vit import vit_patch_size, vit_small
from multifusion.model.registry import create_model, register_model

BASELINES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda num_classes, image_size, **kw: resnet18(num_classes, **kw),
    "resnet50": lambda num_classes, image_size, **kw: resnet50(num_classes, **kw),
    "vit_small": vit_small,
    "swin_tiny": swin_tiny,
    "vig": lambda num_classes, image_size, **kw: _vig(num_classes, image_size, **kw),
}
for _name, _builder in BASELINES.items():
    register_model(_name)(_builder)


def _vig(num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    from multifusion.model.baselines.vig import vig_tiny  # needs the project's graph module

    return vig_tiny(num_classes, image_size, **kwargs)


def build_baseline(name: str, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """A baseline by name (resnet18, resnet50, vit_small, swin_tiny, vig), 1 input channel.

    ``kwargs`` reach the architecture (e.g. ``in_chans=3`` to compare against timm's
    parameter counts, or a smaller ``depth`` in tests).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline '{name}'; choose one of {', '.join(BASELINES)}")
    return create_model(name, num_classes, image_size, **kwargs)


__all__ = ["BASELINES", "build_baseline", "swin_window_size", "vit_patch_size"]
