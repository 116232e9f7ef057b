"""Every model of the comparison at every training seed: the per-seed runs, their mean and
spread, and one paired test against MultiFusion over all seeds.

The comparison pipeline writes, per name in ``compare.models`` and seed in ``compare.seeds``,

    metrics/compare/<model>/seed<N>.json          test metrics (top1..top5, macro P/R/F1, ece, n, ...)
    plots/compare/<model>/seed<N>/confusion.csv   actual,predicted: one row per test image

Every model is set against ``multifusion`` (the full model) trained with the same seed, image
by image: ``b`` images only MultiFusion gets right, ``c`` only the model. The one test over the
seeds is the exact McNemar test on the pairs pooled over every seed (sum of ``b``, sum of
``c``): it uses every test image at every seed. A sign test over the seeds would use one bit per
seed: with 3 seeds its smallest two-sided p is 2 / 2**3 = 0.25 (0.125 one-sided), so it could
never reach 0.05. The pooled test treats an image at two seeds as two pairs, which overstates
the evidence when the same images flip at every seed: read it with the per-seed counts beside it.

    runs = read_runs("metrics/compare", ["multifusion", "resnet18"], [42, 43, 44], "plots/compare")
    stats = summarize(runs)          # name -> {top1 (mean), top1_std, ..., mcnemar_p, per_seed}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.core.config import FULL_MODEL
from multifusion.evaluation.paired_test import mcnemar_exact, paired_counts, read_confusion_csv

TOPK = ("top1", "top2", "top3", "top5")
PRF = ("macro_precision", "macro_recall", "macro_f1")
MEANS = TOPK + PRF + ("ece", "train_seconds")     # averaged over the seeds
SPREADS = ("top1", "macro_f1")                     # also given as std and min-max


@dataclass(frozen=True)
class SeedRun:
    """One model trained at one seed: its test metrics and, when read, its per-image predictions."""

    metrics: dict[str, Any]
    labels: np.ndarray | None = None
    preds: np.ndarray | None = None


def read_metrics(path: str | Path) -> dict[str, Any]:
    """One metrics JSON (flat, or nested under "test"); a clear error when keys are missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file missing; run its stage first (dvc repro comparison/dvc.yaml)")
    data = json.loads(path.read_text())
    if "top1" not in data and isinstance(data.get("test"), dict):
        data = data["test"]
    missing = [k for k in TOPK + PRF if k not in data]
    if missing:
        raise ValueError(f"{path}: missing metric keys {missing}; re-run the stage that writes it")
    return data


def metrics_path(compare_dir: str | Path, model: str, seed: int) -> Path:
    return Path(compare_dir) / model / f"seed{seed}.json"


def predictions_path(plots_dir: str | Path, model: str, seed: int) -> Path:
    return Path(plots_dir) / model / f"seed{seed}" / "confusion.csv"


def read_runs(
    compare_dir: str | Path, models: list[str], seeds: list[int], plots_dir: str | Path | None = None
) -> dict[str, dict[int, SeedRun]]:
    """{model: {seed: SeedRun}} for every model and seed, in the given orders. With ``plots_dir``
    also the per-image predictions, which must all score the same test images (ValueError naming
    the file otherwise)."""
    runs: dict[str, dict[int, SeedRun]] = {}
    reference: tuple[Path, np.ndarray] | None = None
    for model in models:
        runs[model] = {}
        for seed in seeds:
            metrics = read_metrics(metrics_path(compare_dir, model, seed))
            labels = preds = None
            if plots_dir is not None:
                path = predictions_path(plots_dir, model, seed)
                labels, preds = read_confusion_csv(path)
                if reference is None:
                    reference = (path, labels)
                elif not np.array_equal(labels, reference[1]):
                    raise ValueError(f"{path}: its test images differ from {reference[0]}'s; rerun both on the same data/prepared")
            runs[model][seed] = SeedRun(metrics, labels, preds)
    return runs


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (sample, ddof 1; 0 for a single value), min and max."""
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def summarize(runs: dict[str, dict[int, SeedRun]]) -> dict[str, dict[str, Any]]:
    """Per model: the mean over seeds of every metric in MEANS (under its own key, e.g. ``top1``),
    ``<key>_std/_min/_max`` for SPREADS, ``n_seeds``, ``n`` (test images), ``per_seed``
    ({seed: top1, macro_f1 and, against MultiFusion at that seed, the paired counts}) and, when the
    predictions were read, the pooled counts ``only_multifusion_right``, ``only_model_right`` and
    their exact McNemar ``mcnemar_p``. MultiFusion is the reference: it has no paired entries."""
    if FULL_MODEL not in runs:
        raise ValueError(f"compare.models lacks {FULL_MODEL!r}: the report sets every model against it; add it in params.yaml")
    full = runs[FULL_MODEL]
    summary: dict[str, dict[str, Any]] = {}
    for name, by_seed in runs.items():
        row: dict[str, Any] = {}
        for key in MEANS:
            values = [run.metrics[key] for run in by_seed.values() if key in run.metrics]
            if len(values) == len(by_seed):  # a key some seed lacks (e.g. train_seconds) is left out
                stats = spread(values)
                row[key] = stats["mean"]
                if key in SPREADS:
                    row |= {f"{key}_{s}": stats[s] for s in ("std", "min", "max")}
        row["n_seeds"] = len(by_seed)
        first = next(iter(by_seed.values())).metrics
        if "n" in first:
            row["n"] = int(first["n"])
        per_seed: dict[str, dict[str, Any]] = {}
        pooled = [0, 0]
        paired = all(run.preds is not None for run in by_seed.values())
        for seed, run in by_seed.items():
            entry: dict[str, Any] = {"top1": float(run.metrics["top1"]), "macro_f1": float(run.metrics["macro_f1"])}
            if paired and name != FULL_MODEL:
                b, c = paired_counts(run.labels, full[seed].preds, run.preds)
                entry |= {"only_multifusion_right": b, "only_model_right": c}
                pooled[0] += b
                pooled[1] += c
            per_seed[str(seed)] = entry
        if paired and name != FULL_MODEL:
            row |= {"only_multifusion_right": pooled[0], "only_model_right": pooled[1], "mcnemar_p": mcnemar_exact(*pooled)}
        row["per_seed"] = per_seed
        summary[name] = row
    return summary
