"""Stage low_label (comparison/dvc.yaml, one per k in compare.labels_per_class): the prepared set
with k labelled groups per class in its train split, val and test unchanged image for image.

    python stages/low_label.py --prepared data/prepared --per-class 10 --out data/low_label/k10

k counts the manifest's groups (near-copies, crops of one micrograph), not files; the draw is
compare.label_draw's, the same for every model and training seed (multifusion.data.low_label).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.config import load_config
from multifusion.core.errors import run_stage
from multifusion.data.low_label import write_low_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--per-class", type=int, required=True, help="labelled groups per class (one of compare.labels_per_class)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    counts = write_low_label(args.prepared, args.out, args.per_class, cfg.compare.label_draw)
    print(f"low_label k={args.per_class} (draw {cfg.compare.label_draw}): {args.out}: "
          + ", ".join(f"{split} {n}" for split, n in counts.items()))


if __name__ == "__main__":
    run_stage("low_label", main)
