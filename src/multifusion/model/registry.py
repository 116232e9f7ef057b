"""One registry for every model the project trains, as timm's ``create_model``:

    model = create_model("resnet18", num_classes=10, image_size=64)
    model = create_model("multifusion", num_classes=10, image_size=64,
                         hnf={...}, graph={...}, fusion={...}, text=features, classes=names)
    model.architecture   # {"name": ..., "args": {...}}: what the model card stores to rebuild it

A model is built by name from plain arguments (numbers, strings, dicts: what a JSON model
card holds). ``text`` and ``classes`` are not architecture arguments: the text features
are weights (buffers in the state dict) and the class names live in the card beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from multifusion.text.features import TextFeatures

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes, image_size, **args)`` under ``name``."""

    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return add


def list_models() -> list[str]:
    _register_all()
    return sorted(MODELS)


def create_model(
    name: str,
    num_classes: int,
    image_size: int,
    *,
    text: TextFeatures | None = None,
    classes: Sequence[str] | None = None,
    **args: Any,
) -> nn.Module:
    """The untrained model ``name`` with ``num_classes`` outputs for (B, 1, S, S) inputs,
    S = ``image_size``. ``args`` are its architecture arguments (JSON-able); ``text`` and
    ``classes`` reach the models that fuse class descriptions (MultiFusion). The module
    carries ``architecture = {"name", "args"}`` for the model card."""
    _register_all()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    extra = {} if name != "multifusion" else {"text": text, "classes": classes}
    model = MODELS[name](num_classes=num_classes, image_size=image_size, **args, **extra)
    model.architecture = {"name": name, "args": dict(args)}
    return model


def _register_all() -> None:
    """Import the modules whose builders register themselves (once)."""
    import multifusion.model.baselines  # noqa: F401
    import multifusion.model.hnf  # noqa: F401
