"""Selective prediction: call only the images the model is confident enough about.

The risk-coverage curve ranks images by confidence (the calibrated top-1 probability),
highest first. Keeping every image with confidence >= t gives a coverage (share kept) and a
selective risk (error rate among the kept). Images of equal confidence are kept or dropped
together (a threshold cannot split them), so the curve has one point per distinct
confidence.

    curve = risk_coverage(confidence, correct)           # confidence (N,), correct (N,) bool
    aurc(confidence, correct)                            # area under the full curve (lower is better)
    curve.coverage_at(0.99)                              # largest coverage with accuracy >= 0.99
    curve.threshold_for(0.99)                            # the confidence that keeps it (None: none does)

``evaluate`` writes the test split's curve (``plots/evaluate/risk_coverage.csv``, a DVC
plot, and ``.png``), its area and the coverage at each ``ood.target_accuracies``.
``train`` stores the val curve in the model card (``"selective"``); ``predict
--target-accuracy a`` keeps the rows at or above the val curve's threshold for ``a`` and
marks the rest ``abstained``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.core.atomic import atomic_write
from multifusion.core.plotting import pyplot, save_figure


@dataclass
class RiskCoverage:
    """One point per distinct confidence, highest confidence first."""

    threshold: np.ndarray   # (P,) keep images with confidence >= threshold[i]
    coverage: np.ndarray    # (P,) share of images kept
    accuracy: np.ndarray    # (P,) accuracy among the kept (1 - selective risk)
    n: int                  # images on the curve

    @property
    def risk(self) -> np.ndarray:
        return 1.0 - self.accuracy

    def best_index(self, target: float) -> int | None:
        """The point of largest coverage whose kept accuracy reaches ``target`` (None: none does)."""
        ok = np.nonzero(self.accuracy >= target - 1e-12)[0]
        return int(ok[-1]) if len(ok) else None

    def coverage_at(self, target: float) -> float:
        """The largest share of images kept at accuracy >= ``target`` (0 when none)."""
        i = self.best_index(target)
        return 0.0 if i is None else float(self.coverage[i])

    def threshold_for(self, target: float) -> float | None:
        """The confidence threshold that reaches ``target`` at the largest coverage (None: abstain on all)."""
        i = self.best_index(target)
        return None if i is None else float(self.threshold[i])

    def rows(self) -> list[dict[str, float]]:
        """The curve as DVC plot rows: coverage, risk, accuracy, threshold."""
        return [
            {"coverage": round(float(c), 6), "risk": round(float(1 - a), 6), "accuracy": round(float(a), 6), "threshold": round(float(t), 6)}
            for t, c, a in zip(self.threshold, self.coverage, self.accuracy)
        ]

    def record(self) -> dict[str, Any]:
        """The card's ``"selective"`` entry: the curve itself (small: one point per distinct confidence)."""
        return {"threshold": [float(t) for t in self.threshold], "coverage": [float(c) for c in self.coverage],
                "accuracy": [float(a) for a in self.accuracy], "n": int(self.n)}

    @classmethod
    def from_record(cls, entry: dict[str, Any]) -> "RiskCoverage":
        return cls(np.asarray(entry["threshold"], dtype=np.float64), np.asarray(entry["coverage"], dtype=np.float64),
                   np.asarray(entry["accuracy"], dtype=np.float64), int(entry["n"]))


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    """confidence (N,), correct (N,) bool -> the risk-coverage curve (one point per distinct confidence)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape or confidence.ndim != 1 or len(confidence) == 0:
        raise ValueError(f"risk_coverage: expected confidence (N,) and correct (N,) with N > 0, got {confidence.shape} and {correct.shape}")
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], np.cumsum(correct[order])  # (N,), (N,)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # a cut after row i keeps rows 0..i
    kept = np.nonzero(last_of_tie)[0] + 1  # (P,) images kept at each cut
    return RiskCoverage(conf[kept - 1], kept / len(conf), hits[kept - 1] / kept, len(conf))


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean over k = 1..N of the error rate among the k
    most confident images (Geifman et al. 2019), ties kept together at their group's risk."""
    curve = risk_coverage(confidence, correct)
    kept = np.rint(curve.coverage * curve.n).astype(np.int64)  # (P,)
    sizes = np.diff(np.r_[0, kept])  # images each point adds
    return float((sizes * curve.risk).sum() / curve.n)


def selective_metrics(confidence: np.ndarray, correct: np.ndarray, targets: list[float]) -> dict[str, float]:
    """``aurc`` and ``coverage_at_<a>`` (e.g. coverage_at_0.99) for every target accuracy."""
    curve = risk_coverage(confidence, correct)
    out = {"aurc": aurc(confidence, correct)}
    out |= {f"coverage_at_{t:g}": curve.coverage_at(t) for t in targets}
    return out


def abstain_mask(confidence: np.ndarray, curve: RiskCoverage, target: float) -> np.ndarray:
    """confidence (N,) -> (N,) bool: abstain where it is below the val curve's threshold for ``target``."""
    threshold = curve.threshold_for(target)
    confidence = np.asarray(confidence, dtype=np.float64)
    return np.ones(len(confidence), dtype=bool) if threshold is None else confidence < threshold


def write_curve_csv(path: str | Path, curve: RiskCoverage) -> None:
    """The curve as a DVC plot CSV (coverage, risk, accuracy, threshold), written atomically."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["coverage", "risk", "accuracy", "threshold"])
        writer.writeheader()
        writer.writerows(curve.rows())


def plot_curve_png(path: str | Path, curve: RiskCoverage, targets: list[float], title: str) -> None:
    """Selective risk against coverage, with each target accuracy's largest coverage marked (PNG, atomic)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.step(curve.coverage, curve.risk, where="post", color="C0", label="test split")
    for i, target in enumerate(targets):
        cov = curve.coverage_at(target)
        ax.axhline(1 - target, color=f"C{i + 1}", ls=":", lw=1)
        ax.plot([cov], [1 - target], "o", color=f"C{i + 1}", label=f"accuracy {target:g}: coverage {cov:.3f}")
    ax.set_xlabel("coverage (share of images called)")
    ax.set_ylabel("selective risk (error rate among the called)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, float(curve.risk.max()) * 1.1))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
