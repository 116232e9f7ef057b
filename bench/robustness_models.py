"""Trained comparison runs under the robustness shifts, scored again under this version's input
policy (``data.grey_levels``: a shifted image goes through it again), with the comparison
report's tables: accuracy per shift level and MultiFusion against each model, paired per level.

    python bench/robustness_models.py --params params.yaml --prepared data/prepared \
        --runs models/compare --models multifusion resnet18 vig --seeds 42 43 44 \
        --scores /tmp/rob --before <old workspace>/models/compare > bench/results/<name>.txt

For runs trained before the compare stage applied the policy to the shifts (or with
``compare.robustness: false``). Each run's scores go to ``<scores>/<model>/seed<N>/robustness.json``
(kept: a second call reuses them). ``--before`` names runs of the same models and seeds with
their own ``robustness.json`` (e.g. trained on the original grey levels), for a line per model:
clean and mean shifted accuracy before and now.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from multifusion.core.atomic import atomic_path
from multifusion.core.config import load_config
from multifusion.data.dataset import load_prepared
from multifusion.evaluation.robustness import evaluate_under_shifts
from multifusion.model.card import load_model
from multifusion.reporting.report import LABELS
from multifusion.reporting.robustness_report import Results, accuracies, read_robustness, robustness_markdown


def clean_and_shifted(runs: dict[int, dict]) -> tuple[float, float]:
    """(clean accuracy, accuracy over every shift level), each the mean over the seeds."""
    clean = np.mean([r["clean"]["accuracy"] for r in runs.values()])
    shifted = np.mean([np.mean([v for (_, level), v in accuracies(r).items() if level > 0]) for r in runs.values()])
    return float(clean), float(shifted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the shifts and the input policy")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared set the runs were trained on")
    parser.add_argument("--runs", type=Path, required=True, help="<runs>/<model>/seed<N>: saved model folders")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--scores", type=Path, required=True, help="where each run's robustness.json goes")
    parser.add_argument("--before", type=Path, help="runs of the same models and seeds with their robustness.json")
    args = parser.parse_args()
    cfg = load_config(args.params)
    prepared = load_prepared(args.prepared)
    test = prepared.split_indices("test")
    images, labels = np.asarray(prepared.images[test]), prepared.labels(test)
    for model in args.models:
        for seed in args.seeds:
            out = args.scores / model / f"seed{seed}" / "robustness.json"
            if out.is_file():
                continue
            start = time.perf_counter()
            loaded = load_model(args.runs / model / f"seed{seed}")
            result = evaluate_under_shifts(loaded.model, images, labels, cfg, loaded.temperature, keep_predictions=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                tmp.write_text(json.dumps(result))
            print(f"{model} seed {seed}: clean {result['clean']['accuracy']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    now: Results = read_robustness(args.scores, args.models, args.seeds)
    names = {model: LABELS.get(model, model) for model in args.models}
    print(f"\ndata.grey_levels: {cfg.data.grey_levels}; {len(labels)} test images\n")
    print(robustness_markdown(now, names))
    if args.before:
        before = read_robustness(args.before, args.models, args.seeds)
        if before is None:
            raise SystemExit(f"{args.before}: a robustness.json of some model and seed is missing")
        print("\nSingle-view accuracy, mean over the seeds: clean, and over every shift level; before -> now\n")
        for model in args.models:
            (c0, s0), (c1, s1) = clean_and_shifted(before[model]), clean_and_shifted(now[model])
            print(f"- {names[model]}: clean {c0:.3f} -> {c1:.3f}; shifted {s0:.3f} -> {s1:.3f}")


if __name__ == "__main__":
    main()
