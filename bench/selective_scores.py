"""Which confidence should selective prediction rank by? The risk-coverage curve's area and the
coverage at given accuracies, for several confidences of the same calls, on val and test.

    python bench/selective_scores.py --model models/hnf --prepared data/prepared \
        [--model models/compare/multifusion/seed43 ...] --out bench/results/selective_scores_<date>.txt

The calls are the full 8-view policy's (``evaluate``'s: the argmax of the logits averaged over
the eight dihedral views). Only the confidence that ranks them changes:

- ``max_prob``: the calibrated top-1 probability of the averaged logits (the product's today:
  ``evaluate``, the card's val curve, ``predict --target-accuracy``);
- ``margin``: top-1 minus top-2 of those probabilities;
- ``view_mean``: each view's calibrated probability of the call, averaged over the eight views
  (probabilities averaged instead of logits);
- ``view_min``: the smallest of those eight probabilities;
- ``view_agreement``: the share of views whose own argmax is the call (ties broken by max_prob).

Lower AURC is better everywhere on the curve; ``coverage@a`` is the largest share of images
kept with accuracy >= a (the issue's goal reads coverage@0.99).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import torch

from adaptive_views import view_logits
from multifusion.data.dataset import load_prepared
from multifusion.evaluation.evaluate import softmax
from multifusion.evaluation.selective import selective_metrics
from multifusion.model.card import load_model

TARGETS = [0.99, 0.98, 0.95]


def confidences(views: np.ndarray, temperature: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """views (8, N, K) logits -> (calls (N,), {name: confidence (N,)})."""
    probs = softmax(views.mean(axis=0), temperature)  # (N, K)
    calls = probs.argmax(axis=1)  # (N,)
    per_view = np.stack([softmax(v, temperature) for v in views])  # (8, N, K)
    of_call = per_view[:, np.arange(len(calls)), calls]  # (8, N)
    top2 = np.sort(probs, axis=1)[:, -2:]  # (N, 2)
    return calls, {
        "max_prob": probs.max(axis=1),
        "margin": top2[:, 1] - top2[:, 0],
        "view_mean": of_call.mean(axis=0),
        "view_min": of_call.min(axis=0),
        "view_agreement": (per_view.argmax(axis=2) == calls).mean(axis=0) + 1e-3 * probs.max(axis=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="a model folder; repeat for several")
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    prepared = load_prepared(args.prepared)
    lines = [f"=== bench/selective_scores.py {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{torch.get_num_threads()} thread(s), {args.prepared}"]
    header = f"  {'confidence':15s} {'aurc':>7s} " + " ".join(f"{'cov@' + format(t, 'g'):>8s}" for t in TARGETS)
    for model_dir in args.model:
        loaded = load_model(model_dir)
        lines.append(f"{model_dir} (T {loaded.temperature:.3f})")
        for split in ("val", "test"):
            idx = prepared.split_indices(split)
            labels = prepared.labels(idx)
            calls, scores = confidences(view_logits(loaded.model, np.asarray(prepared.images[idx]), args.batch), loaded.temperature)
            correct = calls == labels
            lines.append(f" {split}: {len(labels)} images, {int((~correct).sum())} wrong (8-view top-1 {correct.mean():.4f})")
            lines.append(header)
            for name, conf in scores.items():
                m = selective_metrics(conf, correct, TARGETS)
                lines.append(f"  {name:15s} {m['aurc']:7.4f} " + " ".join(f"{m[f'coverage_at_{t:g}']:8.3f}" for t in TARGETS))
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
