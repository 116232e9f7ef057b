"""Training seeds beside a comparison: the same models retrained with another ``seed``.

One comparison run is one training seed per model, and on ~300 test images two seeds of
one config differ by several images. A set's report folder may hold the per-image test
predictions of more seeds:

    reports/<set>/seeds/<model>/seed<N>.csv     actual,predicted (one row per test image)

``<model>`` is a name of the comparison (``multifusion``, ``vig``, ``mf_no_text``, ...),
``seed<N>`` the ``seed`` param it was trained with (the split is the prepared data's and
the same in every file: that is checked). The comparison's own run is one of them (a copy
of its ``confusion.csv``), so every figure here is computed from the committed files:

    table = seed_table(Path("reports/ncm"))     # markdown, rendered into the README by readme_tables
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from multifusion.evaluation.evaluate import macro_scores
from multifusion.evaluation.paired_test import paired_counts, read_confusion_csv
from multifusion.reporting.report import FULL, LABELS, is_ablation

SEEDS = "seeds"
SEED_FILE = re.compile(r"seed(\d+)\.csv")


def read_seed_runs(set_dir: Path) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """{model: {seed: (labels, preds)}} from ``set_dir/seeds``; MultiFusion first, then the
    baselines, then the ablations. ValueError (naming the file) when a file's test images
    differ from the others' or its name is not ``seed<N>.csv``."""
    runs: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    reference: tuple[Path, np.ndarray] | None = None
    for model_dir in sorted(p for p in (set_dir / SEEDS).iterdir() if p.is_dir()):
        for path in sorted(model_dir.iterdir()):
            match = SEED_FILE.fullmatch(path.name)
            if match is None:
                raise ValueError(f"{path}: not a seed<N>.csv of per-image predictions; rename or remove it")
            labels, preds = read_confusion_csv(path)
            if reference is None:
                reference = (path, labels)
            elif len(labels) != len(reference[1]) or (labels != reference[1]).any():
                raise ValueError(f"{path}: its test images differ from {reference[0]}'s; every seed must score the same split")
            runs.setdefault(model_dir.name, {})[int(match.group(1))] = (labels, preds)
    return dict(sorted(runs.items(), key=lambda item: (item[0] != FULL, is_ablation(item[0]), item[0])))


def seed_table(set_dir: Path) -> str:
    """Markdown: per model, top-1 / macro-F1 at each seed, their mean (of two or more), and image by image
    against MultiFusion trained with the same seed (only MultiFusion / only it right)."""
    runs = read_seed_runs(set_dir)
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    ours = runs.get(FULL, {})
    header = ["model", *(f"seed {s}: top-1 / macro F1" for s in seeds), "mean", "only MF / only it right, per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_seed in runs.items():
        cells, top1s, f1s, paired = [], [], [], []
        for seed in seeds:
            if seed not in by_seed:
                cells.append("–")
                continue
            labels, preds = by_seed[seed]
            top1, f1 = float((preds == labels).mean()), macro_scores(labels, preds)[2]
            top1s.append(top1)
            f1s.append(f1)
            cells.append(f"{top1:.3f} / {f1:.3f}")
            if name != FULL and seed in ours:
                paired.append("{} / {}".format(*paired_counts(labels, ours[seed][1], preds)))
        mean = f"{np.mean(top1s):.3f} / {np.mean(f1s):.3f}" if len(top1s) > 1 else "–"  # one run is no mean
        label = f"**{LABELS.get(name, name)}**" if name == FULL else LABELS.get(name, name)
        lines.append(f"| {label} | {' | '.join(cells)} | {mean} | {', '.join(paired) or '–'} |")
    return "\n".join(lines)
