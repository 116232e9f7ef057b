"""Two trained runs of one model side by side under the robustness shifts: accuracy per shift
level and the paired counts (exact McNemar), image by image on the same shifted test images.
For an A/B of a training change (an augmentation, a recipe) at the same seed and budget.

    python bench/robustness_pair.py --a models/compare/multifusion/seed42 --b <other>/models/compare/multifusion/seed42 \
        [--a-metrics metrics/compare/multifusion/seed42.json --b-metrics ...] --out bench/results/<name>.txt

Each folder holds the ``robustness.json`` the compare stage writes with ``compare.robustness``
(single views; clean = level 0). With ``--a-metrics`` / ``--b-metrics`` the table starts with
the 8-view clean test scores of the compare stage's metrics file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from multifusion.evaluation.paired_test import mcnemar_exact, paired_counts
from multifusion.reporting.robustness_report import ROBUSTNESS, accuracies, levels, predictions


def pair_rows(a: dict, b: dict) -> list[tuple[str, float, float, int, int, float]]:
    """Two ``robustness.json`` results of the same test images -> per shift level (label,
    accuracy A, accuracy B, images only A gets right, only B, exact McNemar p)."""
    labels = np.asarray(a["labels"])
    if not np.array_equal(labels, np.asarray(b["labels"])):
        raise ValueError("the two runs were scored on different test images; pair runs of the same prepared split")
    acc_a, acc_b = accuracies(a), accuracies(b)
    rows = []
    for shift, level, severity in levels({"a": {0: a}}):
        only_a, only_b = paired_counts(labels, predictions(a, shift, level), predictions(b, shift, level))
        name = "clean (1 view)" if level == 0 else f"{shift} {level} ({severity:g})"
        rows.append((name, acc_a[(shift, level)], acc_b[(shift, level)], only_a, only_b, mcnemar_exact(only_a, only_b)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="run A's model folder (with robustness.json)")
    parser.add_argument("--b", type=Path, required=True, help="run B's model folder")
    parser.add_argument("--a-metrics", type=Path, help="run A's compare metrics json (8-view clean scores)")
    parser.add_argument("--b-metrics", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    a, b = (json.loads((folder / ROBUSTNESS).read_text()) for folder in (args.a, args.b))
    lines = [f"A: {args.a}", f"B: {args.b}", f"{a['n_images']} test images", ""]
    if args.a_metrics and args.b_metrics:
        ma, mb = (json.loads(p.read_text()) for p in (args.a_metrics, args.b_metrics))
        lines.append(f"8-view clean test: A top-1 {ma['top1']:.4f} macro-F1 {ma['macro_f1']:.4f} | "
                     f"B top-1 {mb['top1']:.4f} macro-F1 {mb['macro_f1']:.4f}")
    lines.append(f"{'shift level':<28} {'A':>6} {'B':>6} {'B-A':>7} {'only A':>6} {'only B':>6} {'p':>6}")
    rows = pair_rows(a, b)
    for name, acc_a, acc_b, only_a, only_b, p in rows:
        lines.append(f"{name:<28} {acc_a:6.3f} {acc_b:6.3f} {acc_b - acc_a:+7.3f} {only_a:6d} {only_b:6d} {p:6.3f}")
    shifted = [r for r in rows if not r[0].startswith("clean")]
    lines.append(f"mean over the {len(shifted)} shifted levels: A {np.mean([r[1] for r in shifted]):.3f}, "
                 f"B {np.mean([r[2] for r in shifted]):.3f}")
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
