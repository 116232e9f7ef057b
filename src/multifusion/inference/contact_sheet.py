"""A contact sheet: a grid of micrographs, each captioned with its top predictions.

``multifusion predict --contact-sheet sheet.png`` draws the least certain images so a
person can review them first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multifusion.core.plotting import pyplot, save_figure


@dataclass
class SheetEntry:
    path: str                           # the file the image came from
    image: np.ndarray                   # (S, S) uint8, as the model saw it
    top: list[tuple[str, float]]        # (class name, calibrated probability), best first


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def draw_contact_sheet(entries: list[SheetEntry], path: str | Path, title: str = "", columns: int = 4, lines: int = 3) -> None:
    """Grid of ``entries`` (row-major, in the given order) with file name and the top
    ``lines`` predictions under each image; written as PNG (matplotlib, Agg)."""
    if not entries:
        raise ValueError("draw_contact_sheet: no images to draw")
    plt = pyplot()
    columns = max(1, min(columns, len(entries)))
    rows = (len(entries) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[len(entries) :]:
        ax.axis("off")
    for ax, entry in zip(axes.flat, entries):
        ax.imshow(entry.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_shorten(Path(entry.path).name, 30), fontsize=8)
        caption = "\n".join(f"{name[:24]:<24s} {prob:.2f}" for name, prob in entry.top[:lines])
        ax.set_xlabel(caption, fontsize=7, family="monospace")  # a label, so tight_layout makes room
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
