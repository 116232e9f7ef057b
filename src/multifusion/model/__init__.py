"""The MultiFusion HNF model and its building blocks.

    model = build_model(cfg, num_classes, text)   # text: TextFeatures, or None when cfg.fusion.text is false
    logits = model(x)                             # x (B, 1, S, S) float -> (B, num_classes)

The text features of all class descriptions live inside the model as persistent buffers;
to rebuild a model before ``load_state_dict``, pass a TextFeatures of zeros of the stored
shape (see ``placeholder_text``).
"""

from __future__ import annotations

import torch
from torch import nn

from multifusion.config import Config
from multifusion.model.hnf import MultiFusion
from multifusion.text.features import TextFeatures

__all__ = ["MultiFusion", "build_model", "placeholder_text"]


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
        return MultiFusion(cfg, num_classes, text.token_states, text.attention_mask)
    return MultiFusion(cfg, num_classes)


def placeholder_text(num_texts: int, length: int, dim: int) -> TextFeatures:
    """A TextFeatures of zeros of shape (T, L, D): rebuilds a text model whose real text
    buffers then come from its state_dict."""
    return TextFeatures(
        token_states=torch.zeros(num_texts, length, dim),
        attention_mask=torch.zeros(num_texts, length, dtype=torch.bool),
        sentence_embeddings=torch.zeros(num_texts, dim),
        class_names=[""] * num_texts,
        templates=[""] * num_texts,
        samples=[0] * num_texts,
    )
