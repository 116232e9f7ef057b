"""The one place matplotlib's backend is chosen: every figure of the project is written to
a file (PNG) by a headless process, so pyplot always runs on the non-interactive Agg.

    plt = pyplot()
    fig, ax = plt.subplots()
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from multifusion.core.atomic import atomic_path


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: stages that draw
    nothing never load matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int) -> None:
    """Write ``fig`` to ``path`` atomically (the extension picks the format) and close it,
    written or not."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".").lower() or None)
    finally:
        pyplot().close(fig)
