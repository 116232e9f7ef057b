"""Stage compare (comparison/dvc.yaml, one matrix entry per name in compare.models and seed in
compare.seeds): train MultiFusion, one baseline or one ablation exactly as `train`, with that
training seed, and score it on the test split.

    python stages/compare.py --model resnet18 --seed 43 --prepared data/prepared --text data/text_features \
        --out models/compare/resnet18/seed43 --checkpoints checkpoints/compare/resnet18/seed43 \
        --live dvclive/compare/resnet18/seed43 --metrics metrics/compare/resnet18/seed43.json \
        --plots plots/compare/resnet18/seed43

$MULTIFUSION_THREADS sets torch's CPU threads (queued runs side by side: cores // jobs).
Writes the weights + config (models/compare/<name>/seed<N>/, loadable with
multifusion.model.card.load_model), test metrics (top1..top5, macro P/R/F1, ECE, plus
params, train_seconds and, with compare.robustness, shifted_top1), the per-image test
predictions (--plots/confusion.csv: the report's paired test against MultiFusion) and dvclive
curves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.errors import run_stage
from multifusion.training.compare import run_comparison
from multifusion.core.config import load_config
from multifusion.data.dataset import load_prepared
from multifusion.evaluation.evaluate import write_confusion_csv
from multifusion.core.json_files import write_json
from multifusion.core.runtime import apply_thread_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="multifusion, a baseline or a key of compare.ablations")
    parser.add_argument("--seed", type=int, required=True, help="training seed (one of compare.seeds); replaces params' seed")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--text", type=Path, default=Path("data/text_features"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for confusion.csv (per-image test predictions)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    threads = apply_thread_env()
    metrics, labels, preds = run_comparison(
        args.model, cfg, args.prepared, args.text, args.out, args.checkpoints, args.live, seed=args.seed
    )
    write_json(args.metrics, metrics)
    write_confusion_csv(args.plots / "confusion.csv", labels, preds, load_prepared(args.prepared).classes)
    print(
        f"compare {args.model} seed {args.seed} ({threads} threads): top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} macro-F1 {metrics['macro_f1']:.3f} "
        f"({metrics['params']:,} params, {metrics['train_seconds']:.0f} s training)"
    )


if __name__ == "__main__":
    run_stage("compare", main)
