"""A prepared set with at most k training images per class, val and test unchanged: the
low-label regime, where a per-class prior such as the descriptions has the most room to help.

    python bench/subsample_train.py data/prepared /tmp/k8/data/prepared --per-class 8
    ln -s "$PWD/data/text_features" /tmp/k8/data/text_features
    cd /tmp/k8 && python $REPO/stages/train.py --prepared data/prepared --text data/text_features \
        --out models/hnf --checkpoints checkpoints/train --live dvclive/train
    python $REPO/stages/evaluate.py --model models/hnf --prepared data/prepared \
        --metrics metrics/eval.json --per-class metrics/per_class.json --plots plots/evaluate

(train and evaluate read ``params.yaml`` from the working directory: copy the project's,
with any ``-S``-style change edited in.) The draw is fixed (``--seed``), so every model and
training seed sees the same k images of each class; a class with k or fewer keeps all.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from multifusion.data.dataset import IMAGES, MANIFEST, load_prepared


def subsample(prepared_dir: Path, out_dir: Path, per_class: int, seed: int) -> dict[str, int]:
    """Write ``out_dir`` (images.npy, manifest.parquet, classes.json and any other file of
    ``prepared_dir``) keeping at most ``per_class`` train rows of each class; -> rows per split."""
    if per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {per_class}")
    if out_dir.resolve() == prepared_dir.resolve():
        raise ValueError(f"{out_dir}: the output must be another directory than the prepared set it subsamples")
    prepared = load_prepared(prepared_dir)
    manifest = prepared.manifest
    rng = np.random.default_rng(seed)
    keep = np.ones(len(manifest), dtype=bool)
    train = manifest.index[manifest["split"] == "train"]
    for _, rows in manifest.loc[train].groupby("label").groups.items():
        rows = np.asarray(list(rows))
        if len(rows) > per_class:
            keep[rng.choice(rows, len(rows) - per_class, replace=False)] = False
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / IMAGES, np.asarray(prepared.images)[keep])
    manifest[keep].reset_index(drop=True).to_parquet(out_dir / MANIFEST)
    for path in prepared_dir.iterdir():
        if path.is_file() and path.name not in (IMAGES, MANIFEST):
            shutil.copy(path, out_dir / path.name)
    return manifest[keep]["split"].value_counts().to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path, help="a prepared set (data/prepared)")
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--per-class", type=int, default=8, help="training images kept per class")
    parser.add_argument("--seed", type=int, default=0, help="the draw (the same for every model)")
    args = parser.parse_args()
    counts = subsample(args.prepared, args.out, args.per_class, args.seed)
    print(f"{args.out}: " + ", ".join(f"{split} {n}" for split, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
