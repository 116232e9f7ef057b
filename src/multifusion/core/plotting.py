"""The one place matplotlib's backend is chosen: every figure of the project is written to
a file (PNG) by a headless process, so pyplot always runs on the non-interactive Agg.

    plt = pyplot()
    fig, ax = plt.subplots()
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: stages that draw
    nothing never load matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
