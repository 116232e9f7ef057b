"""A prepared set with at most k training groups per class, val and test unchanged: the
low-label regime, where a per-class prior such as the descriptions has the most room to help.

    python bench/subsample_train.py data/prepared /tmp/k8/data/prepared --per-class 8
    ln -s "$PWD/data/text_features" /tmp/k8/data/text_features
    cd /tmp/k8 && python $REPO/stages/train.py --prepared data/prepared --text data/text_features \
        --out models/hnf --checkpoints checkpoints/train --live dvclive/train
    python $REPO/stages/evaluate.py --model models/hnf --prepared data/prepared \
        --metrics metrics/eval.json --per-class metrics/per_class.json --plots plots/evaluate

(train and evaluate read ``params.yaml`` from the working directory: copy the project's,
with any ``-S``-style change edited in.) The draw is fixed (``--seed``), so every model and
training seed sees the same k groups of each class; a class with k or fewer keeps all. k counts
the manifest's groups (near-copies, crops of one micrograph), not files:
multifusion.data.low_label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.data.low_label import write_low_label

subsample = write_low_label  # (prepared_dir, out_dir, per_class, seed) -> rows per split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path, help="a prepared set (data/prepared)")
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--per-class", type=int, default=8, help="training groups (files where ungrouped) kept per class")
    parser.add_argument("--seed", type=int, default=0, help="the draw (the same for every model)")
    args = parser.parse_args()
    counts = write_low_label(args.prepared, args.out, args.per_class, args.seed)
    print(f"{args.out}: " + ", ".join(f"{split} {n}" for split, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
