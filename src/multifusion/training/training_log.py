"""The training log: one row of figures per epoch, written to dvclive (plots and
metrics.json), replayed into a fresh log when a run resumes, and drawn as training
curves at the end.

    live = open_live("dvclive/train", history)          # history: rows of earlier epochs
    log_row(live, epoch_row(epoch, train_loss, train_acc, val, lr))
    close_live(live, history, best_f1, temperature)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from multifusion.core.plotting import pyplot

if TYPE_CHECKING:
    from dvclive import Live
    from matplotlib.figure import Figure


def epoch_row(epoch: int, train_loss: float, train_acc: float, val: dict[str, float], lr: float) -> dict[str, float]:
    """The figures logged for one epoch (``val``: loss, acc, macro_f1 on the val split)."""
    return {
        "epoch": epoch,
        "train/loss": train_loss,
        "train/acc": train_acc,
        "val/loss": val["loss"],
        "val/acc": val["acc"],
        "val/macro_f1": val["macro_f1"],
        "lr": lr,
    }


def log_row(live: Live, row: dict[str, float]) -> None:
    """Log every figure of ``row`` but the epoch number (dvclive's step), then advance a step."""
    for name, value in row.items():
        if name != "epoch":
            live.log_metric(name, value)
    live.next_step()


def open_live(live_dir: str | Path, history: list[dict[str, float]]) -> Live:
    """A fresh dvclive run in live_dir, with the history of a resumed run replayed into it."""
    from dvclive import Live

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None)
    for row in history:
        log_row(live, row)
    return live


def close_live(live: Live, history: list[dict[str, float]], best_f1: float, temperature: float) -> None:
    """The curves image (when an epoch ran), the run's summary figures, then the end of the log."""
    if history:
        live.log_image("training_curves.png", plot_curves(history))
    live.summary["best/val_macro_f1"] = best_f1
    live.summary["temperature"] = temperature
    live.end()


def plot_curves(history: list[dict[str, float]]) -> Figure:
    """Training curves (loss; accuracy and macro-F1) per epoch as a matplotlib figure."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train/loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val/loss"] for h in history], label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_score.plot(epochs, [h["train/acc"] for h in history], label="train acc")
    ax_score.plot(epochs, [h["val/acc"] for h in history], label="val acc")
    ax_score.plot(epochs, [h["val/macro_f1"] for h in history], label="val macro-F1")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylim(0, 1)
    ax_score.legend()
    fig.tight_layout()
    return fig
