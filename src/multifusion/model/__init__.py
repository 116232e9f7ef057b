"""The MultiFusion HNF model and its building blocks.

    model = build_model(cfg, classes, text)   # classes: the prepared data's class names in label
                                              # order; text: TextFeatures, or None when cfg.fusion.text is false
    logits = model(x)                         # x (B, 1, S, S) float -> (B, len(classes))

The text features of all class descriptions live inside the model as persistent buffers;
to rebuild a model before ``load_state_dict``, pass a TextFeatures of zeros of the stored
shape with the stored class names (``multifusion.model.card.placeholder_text``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from multifusion.core.config import Config
from multifusion.model.hnf import MultiFusion
from multifusion.text.features import TextFeatures

__all__ = ["MultiFusion", "build_model", "description_classes"]

REDESCRIBE = "re-run `dvc repro describe embed_text` for the current data/prepared/classes.json"


def description_classes(text: TextFeatures, classes: Sequence[str]) -> torch.Tensor:
    """(T,) label of every description: the index of its class name in ``classes`` (the
    prepared data's classes.json, whose order is the label order). Every class must have a
    description and every description a class, else a one-line ValueError names them."""
    label = {name: i for i, name in enumerate(classes)}
    described = set(text.class_names)
    undescribed = [name for name in classes if name not in described]
    unknown = sorted(described - set(label))
    if undescribed or unknown:
        problems = [f"no description of {', '.join(map(repr, undescribed))}"] if undescribed else []
        problems += [f"descriptions of classes the data does not have: {', '.join(map(repr, unknown))}"] if unknown else []
        raise ValueError(f"the text features do not match the data's classes ({'; '.join(problems)}); {REDESCRIBE}")
    return torch.tensor([label[name] for name in text.class_names], dtype=torch.long)


def build_model(cfg: Config, classes: Sequence[str], text: TextFeatures | None) -> nn.Module:
    """The HNF model of ``cfg`` over ``classes`` (names in label order). ``text`` is required
    iff cfg.fusion.text; every image sees all of its descriptions (no label leakage)."""
    if isinstance(classes, (str, int)) or len(classes) < 2:
        raise ValueError(f"build_model needs the list of at least 2 class names, got {classes!r}; check data/prepared/classes.json")
    if cfg.fusion.text:
        if text is None:
            raise ValueError(
                "fusion.text is true but no text features were given; run `dvc repro embed_text` "
                "(data/text_features/) or set fusion.text: false"
            )
        return MultiFusion(cfg, len(classes), text.token_states, text.attention_mask, description_classes(text, classes))
    return MultiFusion(cfg, len(classes))
