"""The MultiFusion HNF model and its building blocks.

    model = build_model(cfg, num_classes, text)   # text: TextFeatures, or None when cfg.fusion.text is false
    logits = model(x)                             # x (B, 1, S, S) float -> (B, num_classes)

The text features of all class descriptions live inside the model as persistent buffers;
to rebuild a model before ``load_state_dict``, pass a TextFeatures of zeros of the stored
shape with the stored class names (``multifusion.checkpoint.placeholder_text``).
"""

from __future__ import annotations

import torch
from torch import nn

from multifusion.config import Config
from multifusion.model.hnf import MultiFusion
from multifusion.text.features import TextFeatures

__all__ = ["MultiFusion", "build_model", "description_classes"]


def description_classes(text: TextFeatures, num_classes: int) -> torch.Tensor:
    """(T,) class index of every description, classes numbered in order of first appearance.

    The describe stage writes descriptions class by class in classes.json order, so this
    numbering is the label numbering of the prepared data.
    """
    order = list(dict.fromkeys(text.class_names))
    if len(order) != num_classes:
        raise ValueError(
            f"the text features describe {len(order)} classes but the data has {num_classes}; "
            "re-run `dvc repro describe embed_text` for the current data/prepared/classes.json"
        )
    return torch.tensor([order.index(name) for name in text.class_names], dtype=torch.long)


def build_model(cfg: Config, num_classes: int, text: TextFeatures | None) -> nn.Module:
    """The HNF model of ``cfg`` for ``num_classes`` classes. ``text`` is required iff
    cfg.fusion.text; every image sees all of its descriptions (no label leakage)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}; check data/prepared/classes.json")
    if cfg.fusion.text:
        if text is None:
            raise ValueError(
                "fusion.text is true but no text features were given; run `dvc repro embed_text` "
                "(data/text_features/) or set fusion.text: false"
            )
        return MultiFusion(cfg, num_classes, text.token_states, text.attention_mask, description_classes(text, num_classes))
    return MultiFusion(cfg, num_classes)
