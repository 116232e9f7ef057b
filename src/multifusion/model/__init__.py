"""The MultiFusion HNF model, the baselines, and the one registry that builds them all.

    model = create_model("multifusion", num_classes, image_size, hnf={...}, graph={...},
                         fusion={...}, text=features, classes=names)
    model = build_model(cfg, classes, text)   # the same from a params Config: its hnf, graph,
                                              # fusion sections and data.image_size
    logits = model(x)                         # x (B, 1, S, S) float -> (B, len(classes))

The text features of all class descriptions live inside the model as persistent buffers;
to rebuild a model before ``load_state_dict``, pass a TextFeatures of zeros of the stored
shape with the stored class names (``multifusion.model.card.placeholder_text``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from multifusion.core.config import Config
from multifusion.model.hnf import MultiFusion, description_classes
from multifusion.model.registry import create_model, list_models, register_model
from multifusion.text.features import TextFeatures

__all__ = ["MultiFusion", "build_model", "create_model", "description_classes", "list_models", "multifusion_args",
           "register_model"]


def multifusion_args(cfg: Config) -> dict:
    """MultiFusion's architecture arguments in ``cfg``: its own sections, as plain mappings."""
    return {"hnf": dataclasses.asdict(cfg.hnf), "graph": dataclasses.asdict(cfg.graph), "fusion": dataclasses.asdict(cfg.fusion)}


def build_model(cfg: Config, classes: Sequence[str], text: TextFeatures | None) -> nn.Module:
    """The HNF model of ``cfg`` over ``classes`` (names in label order). ``text`` is required
    iff cfg.fusion.text; every image sees all of its descriptions (no label leakage)."""
    if isinstance(classes, (str, int)) or len(classes) < 2:
        raise ValueError(f"build_model needs the list of at least 2 class names, got {classes!r}; check data/prepared/classes.json")
    return create_model("multifusion", len(classes), cfg.data.image_size, text=text if cfg.fusion.text else None,
                        classes=list(classes), **multifusion_args(cfg))
