"""Is one classifier ahead of another on the same test images, or is the gap chance?

Exact McNemar test (McNemar 1947; the exact binomial form, Edwards 1948 without the
continuity correction): two models scored on the same N images disagree on
``b`` images only the first gets right and ``c`` only the second gets right. Under the
null hypothesis that both are equally accurate, each of the ``b + c`` discordant images
is a fair coin, so

    p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])     (two-sided)

The images both get right or both get wrong carry no evidence. On ~300 test images a
3-image gap is far from significant; this is what the comparison report prints beside
each baseline, so "ahead" means ahead, not lucky.

    counts = paired_counts(labels, preds_ours, preds_baseline)   # (b, c)
    p = mcnemar_exact(*counts)
    labels, preds = read_confusion_csv("plots/evaluate/confusion.csv")
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def paired_counts(labels: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray) -> tuple[int, int]:
    """(b, c): images only ``a`` classifies right, images only ``b`` classifies right. (N,) each."""
    labels, preds_a, preds_b = (np.asarray(v) for v in (labels, preds_a, preds_b))
    if not labels.shape == preds_a.shape == preds_b.shape:
        raise ValueError(f"paired test: labels {labels.shape} and predictions {preds_a.shape}, {preds_b.shape} must match")
    right_a, right_b = preds_a == labels, preds_b == labels
    return int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when none)."""
    if b < 0 or c < 0:
        raise ValueError(f"paired test: counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))  # P[X <= min] * 2^n, exact integers
    return min(1.0, 2 * tail / 2**n)


def read_confusion_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An ``actual,predicted`` file (``multifusion.evaluation.evaluate.write_confusion_csv``) -> (labels, preds),
    class names as strings, one entry per test image in the split's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-image predictions; run the stage that writes it (evaluate or compare@<model>)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"actual", "predicted"} <= rows[0].keys():
        raise ValueError(f"{path}: expected columns actual,predicted; rewrite it with `dvc repro`")
    return np.array([r["actual"] for r in rows]), np.array([r["predicted"] for r in rows])
