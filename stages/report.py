"""Stage report (comparison/dvc.yaml): reports/results.md from every model's test metrics.

    python stages/report.py --eval metrics/eval.json --compare metrics/compare --out reports \
        --eval-plots plots/evaluate --compare-plots plots/compare

Reads metrics/eval.json (the full MultiFusion model) and metrics/compare/<name>.json for
each name in compare.models; writes reports/results.md (top-k table and ablation table,
the paper's published figures beside ours), summary.json, results.csv, topk.png and
ablation.png. With --eval-plots and --compare-plots (their confusion.csv files: per-image
test predictions) every run is also set against MultiFusion image by image (exact McNemar).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.reporting.report import report_from_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--compare", type=Path, default=Path("metrics/compare"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--eval-plots", type=Path, default=None, help="evaluate's plots folder (confusion.csv)")
    parser.add_argument("--compare-plots", type=Path, default=None, help="plots/compare: <name>/confusion.csv per run")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    path = report_from_files(cfg, args.eval, args.compare, args.out, args.eval_plots, args.compare_plots)
    print(f"report: {path}")
    print(path.read_text())


if __name__ == "__main__":
    run_stage("report", main)
