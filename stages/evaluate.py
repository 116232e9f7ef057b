"""Stage evaluate: score the trained model on the test split.

    python stages/evaluate.py --model models/hnf --prepared data/prepared \
        --metrics metrics/eval.json --per-class metrics/per_class.json --plots plots/evaluate

Writes metrics/eval.json (top1, top2, top3, top5, macro_precision, macro_recall, macro_f1,
ece after temperature scaling; ece_uncalibrated, nll, nll_uncalibrated, temperature, and
temperature_fitted / temperature_reason: whether and why train fitted that temperature),
metrics/per_class.json and the confusion matrix as DVC plot rows (confusion.csv) and PNG.
Selective prediction: the risk-coverage curve (risk_coverage.csv, a DVC plot, and PNG), its
area ``aurc`` and ``coverage_at_<a>`` for each accuracy a of ``ood.target_accuracies``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sklearn.metrics import confusion_matrix

from multifusion.evaluation.calibration import calibration_summary
from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.data.dataset import load_prepared
from multifusion.evaluation.evaluate import evaluate_split_probs, plot_confusion_png, write_confusion_csv
from multifusion.evaluation.selective import plot_curve_png, risk_coverage, selective_metrics, write_curve_csv
from multifusion.core.json_files import write_json
from multifusion.core.runtime import resolve_device
from multifusion.model.card import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/hnf"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--per-class", type=Path, default=Path("metrics/per_class.json"))
    parser.add_argument("--plots", type=Path, default=Path("plots/evaluate"))
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    loaded = load_model(args.model, device)
    prepared = load_prepared(args.prepared)
    if loaded.classes != prepared.classes:
        raise SystemExit(f"{args.model}: trained on classes {loaded.classes}, but {args.prepared} has {prepared.classes}; retrain")
    metrics, per_class, labels, probs = evaluate_split_probs(
        loaded.model, prepared, args.split, loaded.temperature, cfg.evaluate.batch_size, device, cfg.evaluate.ece_bins,
        cfg.evaluate.tta,
    )
    preds, confidence = probs.argmax(axis=1), probs.max(axis=1)  # (N,), (N,)
    metrics |= calibration_summary(loaded.calibration)
    metrics |= selective_metrics(confidence, preds == labels, cfg.ood.target_accuracies)
    write_json(args.metrics, metrics)
    write_json(args.per_class, per_class)
    write_confusion_csv(args.plots / "confusion.csv", labels, preds, prepared.classes)
    plot_confusion_png(args.plots / "confusion.png", confusion_matrix(labels, preds, labels=range(len(prepared.classes))), prepared.classes,
                       title=f"{loaded.model_name} on the {args.split} split")
    curve = risk_coverage(confidence, preds == labels)
    write_curve_csv(args.plots / "risk_coverage.csv", curve)
    plot_curve_png(args.plots / "risk_coverage.png", curve, cfg.ood.target_accuracies,
                   f"{loaded.model_name}, {args.split} split: risk-coverage (AURC {metrics['aurc']:.4f})")
    print(
        f"evaluate ({args.split}, n={metrics['n']}): top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} "
        f"macro-F1 {metrics['macro_f1']:.3f} ECE {metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f} (T={metrics['temperature']:.2f})"
    )
    print("selective: AURC {:.4f}; ".format(metrics["aurc"]) + ", ".join(
        f"coverage {metrics[f'coverage_at_{a:g}']:.3f} at accuracy {a:g}" for a in cfg.ood.target_accuracies))


if __name__ == "__main__":
    run_stage("evaluate", main)
