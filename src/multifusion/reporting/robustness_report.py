"""The comparison report's robustness section: every model's test accuracy under the shifts of
``robustness.*`` (with ``compare.robustness: true``), MultiFusion set against each baseline at
the same training seed.

Input per model and seed: ``models/compare/<name>/seed<N>/robustness.json``, written by the
compare stage (:func:`multifusion.evaluation.robustness.evaluate_under_shifts`: single views,
the same shifted images for every model, clean = level 0). Output: two markdown tables
(accuracy per shift level, mean over the seeds; MultiFusion minus each baseline per shift
level with the seeds at which MultiFusion is at or above it), the shift levels where a
baseline is ahead on average, and ``robustness.png`` (accuracy against level, one panel per
shift, one line per model with its min-max band over the seeds).

The paired test per shift level is the report's own: image by image against MultiFusion at
the same seed, the exact McNemar test on the pairs pooled over the seeds
(:mod:`multifusion.evaluation.paired_test`), from the per-image calls the compare stage
stores in ``robustness.json``. Runs made before those calls were stored hold accuracies only;
for them the section counts the seeds at which MultiFusion is at or above the model (with 3
seeds no sign test reaches p < 0.25: the counts say how consistent a gap is, not that it is
more than chance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from multifusion.core.config import FULL_MODEL as FULL
from multifusion.core.plotting import pyplot, save_figure
from multifusion.evaluation.paired_test import mcnemar_exact, paired_counts

ROBUSTNESS = "robustness.json"

Results = dict[str, dict[int, dict]]  # model -> seed -> evaluate_under_shifts result


def read_robustness(models_dir: str | Path, models: list[str], seeds: list[int]) -> Results | None:
    """Every ``<models_dir>/<name>/seed<N>/robustness.json``; None when any is missing (the
    comparison ran without ``compare.robustness``)."""
    results: Results = {}
    for name in models:
        for seed in seeds:
            path = Path(models_dir) / name / f"seed{seed}" / ROBUSTNESS
            if not path.is_file():
                return None
            results.setdefault(name, {})[seed] = json.loads(path.read_text())
    return results


def levels(results: Results) -> list[tuple[str, int, float]]:
    """(shift, level, severity) of every shifted test set, in the params order; level 0 = clean."""
    first = next(iter(next(iter(results.values())).values()))
    rows = [("clean", 0, 0.0)]
    for shift, per_severity in first["shifts"].items():
        rows += [(shift, int(e["level"]), float(e["severity"])) for e in sorted(per_severity.values(), key=lambda e: e["level"])]
    return rows


def accuracies(result: dict) -> dict[tuple[str, int], float]:
    """One run's accuracy per (shift, level), clean as ("clean", 0)."""
    out = {("clean", 0): float(result["clean"]["accuracy"])}
    for shift, per_severity in result["shifts"].items():
        for entry in per_severity.values():
            out[(shift, int(entry["level"]))] = float(entry["accuracy"])
    return out


def per_seed(results: Results) -> dict[str, dict[tuple[str, int], np.ndarray]]:
    """model -> (shift, level) -> accuracies (S,) in seed order."""
    table: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    for name, runs in results.items():
        by_seed = [accuracies(runs[s]) for s in sorted(runs)]
        table[name] = {key: np.array([run[key] for run in by_seed]) for key in by_seed[0]}
    return table


def has_predictions(results: Results) -> bool:
    """Every run stored its per-image calls (and the labels) under every shift level."""
    return all("labels" in r and "predictions" in r["clean"]
               and all("predictions" in e for per in r["shifts"].values() for e in per.values())
               for runs in results.values() for r in runs.values())


def predictions(result: dict, shift: str, level: int) -> np.ndarray:
    """One run's per-image calls (N,) at (shift, level); level 0 = clean."""
    if level == 0:
        return np.asarray(result["clean"]["predictions"])
    return np.asarray(next(e["predictions"] for e in result["shifts"][shift].values() if int(e["level"]) == level))


def pooled_counts(results: Results, other: str, shift: str, level: int) -> tuple[int, int]:
    """(b, c) summed over the seeds: images only MultiFusion / only ``other`` gets right at (shift, level)."""
    b = c = 0
    for seed, ours in results[FULL].items():
        theirs = results[other][seed]
        nb, nc = paired_counts(np.asarray(ours["labels"]), predictions(ours, shift, level), predictions(theirs, shift, level))
        b, c = b + nb, c + nc
    return b, c


def _label(shift: str, level: int, severity: float) -> str:
    return "clean" if level == 0 else f"{shift} {level} ({severity:g})"


def robustness_markdown(results: Results, labels: dict[str, str]) -> str:
    """The section's text: both tables and where a baseline is ahead."""
    acc = per_seed(results)
    names = [FULL, *[n for n in results if n != FULL]]
    baselines = names[1:]
    n_seeds = len(next(iter(results.values())))
    head = "| shift (level, severity) | " + " | ".join(labels.get(n, n) for n in names) + " |"
    lines = [
        "## Robustness under shifts",
        "",
        f"Test accuracy on shifted copies of the test split (single view, the same shifted images for every model; mean over "
        f"{n_seeds} seed{'s' if n_seeds > 1 else ''}). The shifts and severities are `robustness.*` in params.yaml.",
        "",
        head,
        "|" + "---|" * (len(names) + 1),
    ]
    behind: list[str] = []
    by_image = has_predictions(results)
    gap_lines = [
        "",
        ("MultiFusion minus each model at the same seed, mean over the seeds; in brackets the test images only MultiFusion / "
         "only the model gets right, pooled over the seeds, and the exact McNemar p of that split."
         if by_image else
         f"MultiFusion minus each model at the same seed, mean over the seeds, and at how many of the {n_seeds} seeds "
         "MultiFusion is at or above it (these runs stored accuracies only, not per-image calls: no per-image test)."),
        "",
        "| shift (level, severity) | " + " | ".join(labels.get(n, n) for n in baselines) + " |",
        "|" + "---|" * (len(baselines) + 1),
    ]
    for shift, level, severity in levels(results):
        key = (shift, level)
        means = {n: float(acc[n][key].mean()) for n in names}
        best = max(means.values())
        lines.append(f"| {_label(shift, level, severity)} | "
                     + " | ".join(f"**{means[n]:.3f}**" if means[n] == best else f"{means[n]:.3f}" for n in names) + " |")
        cells = []
        for n in baselines:
            diff = acc[FULL][key] - acc[n][key]  # (S,)
            if by_image:
                b, c = pooled_counts(results, n, shift, level)
                cells.append(f"{diff.mean():+.3f} ({b} / {c}, p = {mcnemar_exact(b, c):.2g})")
            else:
                cells.append(f"{diff.mean():+.3f} ({int((diff >= 0).sum())}/{len(diff)})")
            if diff.mean() < 0:
                behind.append(f"{labels.get(n, n)} at {_label(shift, level, severity)} ({diff.mean():+.3f})")
        gap_lines.append(f"| {_label(shift, level, severity)} | " + " | ".join(cells) + " |")
    verdict = ("MultiFusion is at or above every model at every shift level, on average over the seeds."
               if not behind else "Where MultiFusion is behind on average: " + "; ".join(behind) + ".")
    return "\n".join([*lines, *gap_lines, "", verdict, "", "![accuracy under shifts](robustness.png)", ""])


def plot_robustness(results: Results | None, path: str | Path, labels: dict[str, str]) -> None:
    """Accuracy against shift level, one panel per shift, one line per model (min-max band over
    the seeds); without results, a figure that says the comparison ran without robustness."""
    plt = pyplot()
    if results is None:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "No robustness runs: the comparison ran with compare.robustness: false",
                ha="center", va="center", fontsize=10)
        save_figure(fig, path, dpi=110)
        return
    acc = per_seed(results)
    rows = levels(results)
    shifts = list(dict.fromkeys(s for s, level, _ in rows if level > 0))
    cols = min(5, len(shifts))
    fig, axes = plt.subplots(-(-len(shifts) // cols), cols, figsize=(3.0 * cols, 2.6 * -(-len(shifts) // cols)), squeeze=False)
    for ax, shift in zip(axes.flat, shifts):
        steps = [0] + [level for s, level, _ in rows if s == shift]
        for name in acc:
            runs = np.stack([acc[name][("clean", 0) if level == 0 else (shift, level)] for level in steps])  # (L, S)
            ax.plot(steps, runs.mean(axis=1), marker="o", markersize=3, label=labels.get(name, name), lw=2 if name == FULL else 1)
            ax.fill_between(steps, runs.min(axis=1), runs.max(axis=1), alpha=0.15)
        ax.set_title(shift, fontsize=9)
        ax.set_xticks(steps)
        ax.set_ylim(0, 1)
        ax.set_xlabel("level (0 = clean)", fontsize=8)
    for ax in list(axes.flat)[len(shifts):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("test accuracy")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
