"""MultiFusion: identify nanomaterials in electron micrographs with Hierarchical Network
Fusion (patch sequences + patch graphs at several scales) and LLM-written class
descriptions, fused by cross-modal attention.

    import multifusion
    clf = multifusion.load_model("models/hnf")
    table = clf.predict(["new_shots/"])   # pandas.DataFrame, one row per file

The API (:mod:`multifusion.api`) is imported on first use, so ``import multifusion``
stays cheap (no torch) for the command line and the stage scripts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

__all__ = ["Classifier", "__version__", "load_model"]

if TYPE_CHECKING:
    from multifusion.api import Classifier, load_model


def __getattr__(name: str) -> Any:
    if name in ("Classifier", "load_model"):
        from multifusion import api

        return getattr(api, name)
    raise AttributeError(f"module 'multifusion' has no attribute {name!r}")
