"""The robustness figure: accuracy against shift severity, one panel per shift."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from multifusion.core.plotting import pyplot, save_figure


def plot_robustness(table: pd.DataFrame, path: str | Path) -> None:
    """One panel per shift: accuracy vs severity level, one line per model; PNG."""
    plt = pyplot()
    shifts = list(dict.fromkeys(table["shift"]))
    cols = 4
    rows = (len(shifts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False, sharey=True)
    for ax, shift in zip(axes.flat, shifts):
        part = table[table["shift"] == shift]
        for model_name, line in part.groupby("model", sort=False):
            line = line.sort_values("level")
            ax.plot(line["level"], line["accuracy"], marker="o", label=model_name)
        levels = part.drop_duplicates("level").sort_values("level")
        ax.set_xticks(levels["level"], ["clean"] + [f"{s:g}" for s in levels["severity"][1:]], fontsize=7)
        ax.set_title(shift, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shifts) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower right", fontsize=8)
    fig.suptitle("Accuracy vs shift severity (test split)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
