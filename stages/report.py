"""Stage report (comparison/dvc.yaml): reports/<set>/results.md from every model at every seed.

    python stages/report.py --compare metrics/compare --compare-plots plots/compare --out reports/ncm

Reads metrics/compare/<name>/seed<N>.json and plots/compare/<name>/seed<N>/confusion.csv (per-image
test predictions) for each name in compare.models (``multifusion``, the full model, among them)
and each seed in compare.seeds; writes results.md (top-k, ablation and seed tables, the paper's
published figures beside ours: means over the seeds with their spread, each model set against
MultiFusion at the same seed image by image, and the exact McNemar test on the pairs pooled over
the seeds), summary.json, results.csv, topk.png, ablation.png and robustness.png (with
compare.robustness, every model's accuracy under the shifts from models/compare/<name>/seed<N>/robustness.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.config import load_config
from multifusion.core.errors import run_stage
from multifusion.core.output_paths import FOLDER_RULE, check_outputs
from multifusion.reporting.report import report_from_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, default=Path("metrics/compare"), help="<name>/seed<N>.json per run")
    parser.add_argument("--compare-plots", type=Path, default=Path("plots/compare"), help="<name>/seed<N>/confusion.csv per run")
    parser.add_argument("--compare-models", type=Path, default=Path("models/compare"),
                        help="<name>/seed<N>/robustness.json per run (read with compare.robustness: true)")
    parser.add_argument("--out", type=Path, required=True, help="reports/<compare.set>")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    check_outputs({"--out": (args.out, FOLDER_RULE)}, [args.params], folders=[args.compare, args.compare_plots, args.compare_models])
    path = report_from_files(cfg, args.compare, args.out, args.compare_plots, args.compare_models)
    print(f"report: {path}")
    print(path.read_text())


if __name__ == "__main__":
    run_stage("report", main)
