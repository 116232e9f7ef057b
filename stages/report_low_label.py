"""Stage report_low_label (comparison/dvc.yaml, one per k in compare.labels_per_class): the table of
every model at every seed trained on k labelled groups per class, tested on the full test split.

    python stages/report_low_label.py --per-class 10 --compare metrics/compare_low_label/k10 \
        --compare-plots plots/compare_low_label/k10 --out reports/ncm/labels_k10.md

Reads <name>/seed<N>.json and <name>/seed<N>/confusion.csv as stage report does (reporting.seed_stats:
means over the seeds, each model against MultiFusion at the same seed image by image, McNemar on
the pooled pairs) and writes one markdown page with the seed table (reporting.report.seed_table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.atomic import write_text
from multifusion.core.config import load_config
from multifusion.core.errors import run_stage
from multifusion.reporting.report import seed_table
from multifusion.reporting.seed_stats import read_runs, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, required=True)
    parser.add_argument("--compare", type=Path, required=True, help="<name>/seed<N>.json per run")
    parser.add_argument("--compare-plots", type=Path, required=True, help="<name>/seed<N>/confusion.csv per run")
    parser.add_argument("--out", type=Path, required=True, help="reports/<compare.set>/labels_k<k>.md")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    seeds = cfg.compare.seeds
    rows = summarize(read_runs(args.compare, cfg.compare.models, seeds, args.compare_plots))
    n_train = {name: row.get("n") for name, row in rows.items()}
    page = (f"# {args.per_class} labelled groups per class\n\n"
            f"Every model of compare.models at seeds {', '.join(map(str, seeds))}, trained on {args.per_class} labelled groups "
            f"per class of the train split (draw {cfg.compare.label_draw}; a group of near-copies or crops of one micrograph "
            f"counts once), the same budget as the full-label comparison, scored on the whole test split "
            f"({next(iter(n_train.values()))} images).\n\n" + seed_table(rows, seeds) + "\n")
    write_text(args.out, page)
    print(f"report_low_label k={args.per_class}: {args.out}")


if __name__ == "__main__":
    run_stage("report_low_label", main)
