"""Inference and classification metrics: top-k accuracy, macro precision/recall/F1 (by
scikit-learn), ECE, a per-class table and the confusion matrix (as DVC plot rows and as
a PNG).

    probs = predict_probs(model, images_u8, batch_size=64, device="cpu", temperature=T)
    metrics = classification_metrics(probs, labels, ece_bins=15)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

from multifusion.evaluation.calibration import nll
from multifusion.data.dataset import Prepared, to_model_input
from multifusion.core.atomic import atomic_write
from multifusion.core.plotting import pyplot, save_figure

TOP_K = (1, 2, 3, 5)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a batch x (B, 1, S, S): micrographs have no orientation."""
    views = []
    for k in range(4):
        turned = torch.rot90(x, k, dims=(-2, -1))
        views += [turned, turned.flip(-1)]
    return views


@torch.no_grad()
def predict_logits(
    model: nn.Module, images_u8: np.ndarray, batch_size: int, device: str | torch.device, tta: bool = False
) -> np.ndarray:
    """uint8 images (N, S, S) -> logits (N, C) float32, in batches, model in eval mode.

    ``tta`` (``evaluate.tta``, the test-time policy of every model alike): the logits are
    averaged over the 8 dihedral views of each image.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(images_u8), batch_size):
        x = to_model_input(np.asarray(images_u8[start : start + batch_size])).to(device)  # (B, 1, S, S)
        views = dihedral_views(x) if tta else [x]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = sum(model(view).float() for view in views) / len(views)             # (B, C)
        chunks.append(logits.cpu())
    model.train(was_training)
    if not chunks:
        raise ValueError("predict_logits: no images given")
    return torch.cat(chunks).numpy()


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits (N, C) / T, computed in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_probs(
    model: nn.Module,
    images_u8: np.ndarray,
    batch_size: int,
    device: str | torch.device,
    temperature: float = 1.0,
    tta: bool = False,
) -> np.ndarray:
    """uint8 images (N, S, S) -> class probabilities (N, C) = softmax(logits / temperature)."""
    return softmax(predict_logits(model, images_u8, batch_size, device, tta), temperature)


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows (probs (N, C), labels (N,)) whose label is among the k highest
    probabilities; k >= C counts every row. Ties rank the lower class index first, as
    argmax does, so top-1 is the accuracy of the argmax predictions."""
    num_classes = probs.shape[1]
    if k >= num_classes:
        return 1.0
    if k == 1:
        return float(accuracy_score(labels, probs.argmax(axis=1)))
    # scikit-learn ranks tied scores higher class index first: in reversed class order
    # that is the lower original index first (C >= 3 here, the multiclass case)
    reversed_labels = num_classes - 1 - labels
    return float(top_k_accuracy_score(reversed_labels, probs[:, ::-1], k=k, labels=np.arange(num_classes)))


def macro_scores(labels: np.ndarray, preds: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall, F1 over the classes present in labels or predictions
    (a class absent from both counts for nothing); 0 where a score is undefined."""
    if len(labels) == 0:
        return 0.0, 0.0, 0.0
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, average="macro", zero_division=0)
    return float(precision), float(recall), float(f1)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE: confidence (max prob) in ``bins`` equal-width bins (lo, hi]; sum of |acc - conf|
    weighted by the bin's share of samples."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)   # (N,)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / max(len(labels), 1))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, ece_bins: int) -> dict[str, float]:
    """top1, top2, top3, top5, macro_precision, macro_recall, macro_f1, ece of probs (N, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or len(labels) == 0:
        raise ValueError(f"expected probs (N, C) and labels (N,) with N > 0, got {probs.shape} and {labels.shape}")
    preds = probs.argmax(axis=1)
    metrics = {f"top{k}": top_k_accuracy(probs, labels, k) for k in TOP_K}
    precision, recall, f1 = macro_scores(labels, preds)
    metrics.update(macro_precision=precision, macro_recall=recall, macro_f1=f1)
    metrics["ece"] = expected_calibration_error(probs, labels, ece_bins)
    return metrics


def per_class_table(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """{class: {precision, recall, f1, support}} for every class, in class order (0 where undefined)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(labels), np.asarray(probs).argmax(axis=1), labels=np.arange(len(classes)), average=None, zero_division=0
    )
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }


def write_confusion_csv(path: str | Path, labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> None:
    """One ``actual,predicted`` row per image (class names): DVC's ``confusion`` template input."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, preds))


def plot_confusion_png(path: str | Path, cm: np.ndarray, classes: list[str], title: str = "Confusion matrix") -> None:
    """Row-normalised confusion matrix with counts, as a PNG (matplotlib, Agg)."""
    plt = pyplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    size = max(5.0, 0.55 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def evaluate_split(
    model: nn.Module,
    prepared: Prepared,
    split: str,
    temperature: float,
    batch_size: int,
    device: str | torch.device,
    ece_bins: int,
    tta: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, float]], np.ndarray, np.ndarray]:
    """Metrics of ``model`` on one split, calibrated by ``temperature``.

    Returns (metrics, per-class table, labels (N,), predictions (N,)). ``metrics`` holds the
    keys of :func:`classification_metrics` after temperature scaling, plus
    ``ece_uncalibrated``, ``nll``, ``nll_uncalibrated``, ``temperature`` and ``n``.
    """
    metrics, table, labels, probs = evaluate_split_probs(model, prepared, split, temperature, batch_size, device, ece_bins, tta)
    return metrics, table, labels, probs.argmax(axis=1)


def evaluate_split_probs(
    model: nn.Module,
    prepared: Prepared,
    split: str,
    temperature: float,
    batch_size: int,
    device: str | torch.device,
    ece_bins: int,
    tta: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, float]], np.ndarray, np.ndarray]:
    """:func:`evaluate_split` with the calibrated probabilities (N, C) in place of the predictions."""
    indices = prepared.split_indices(split)
    if len(indices) == 0:
        raise ValueError(f"split '{split}' of the prepared data is empty; check data.split in params.yaml")
    labels = prepared.labels(indices)
    logits = predict_logits(model, prepared.images[indices], batch_size, device, tta)  # (N, C)
    probs = softmax(logits, temperature)
    metrics = classification_metrics(probs, labels, ece_bins)
    metrics["ece_uncalibrated"] = expected_calibration_error(softmax(logits), labels, ece_bins)
    metrics["nll"] = nll(logits, labels, temperature)
    metrics["nll_uncalibrated"] = nll(logits, labels, 1.0)
    metrics["temperature"] = float(temperature)
    metrics["n"] = int(len(labels))
    return metrics, per_class_table(probs, labels, prepared.classes), labels, probs
