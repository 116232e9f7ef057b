"""Does a model need the micrographs' absolute grey levels? A copy of a prepared set with every
image's grey levels standardized as ``data.grey_levels: standardize`` does it
(``multifusion.data.grey_levels.standardize_grey_levels``), for an A/B on one prepared split
without re-ingesting the folder.

    python bench/standardize_probe.py data/prepared /tmp/std/data/prepared
    # then, in a workspace whose data/prepared is that copy (and data/text_features the original's):
    python stages/compare.py --model multifusion --seed 42 --prepared data/prepared --text data/text_features ...

It first prints how far grey levels alone go: a random forest on four statistics of each image
(``grey_stats``), on the given set and on the copy. Every split is standardized the same way, so
train, val and test stay one distribution; the split, labels and groups are the original's. Where
the standardized model scores as the original does, the classes are told apart by texture, not by
acquisition settings; where it scores lower, grey level carries part of the evidence (or of the
acquisition's confounds). On a set prepared with ``data.grey_levels: standardize`` the copy is
the set itself (standardizing twice changes only rounding).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from multifusion.core.atomic import atomic_path
from multifusion.data.dataset import IMAGES, load_prepared
from multifusion.data.grey_levels import GREY_MEAN, GREY_STD, standardize_grey_levels


def grey_stats(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) -> (N, 4): each image's mean, standard deviation, 5th and 95th percentile."""
    x = images.reshape(len(images), -1).astype(np.float64)
    return np.stack([x.mean(1), x.std(1), np.percentile(x, 5, axis=1), np.percentile(x, 95, axis=1)], axis=1)


def stats_top1(images: np.ndarray, labels: np.ndarray, split: np.ndarray, seed: int = 0) -> float:
    """Test top-1 of a random forest (scikit-learn, 300 trees) that sees only ``grey_stats``,
    fitted on the train split: how far grey levels alone go."""
    from sklearn.ensemble import RandomForestClassifier

    stats = grey_stats(images)
    train, test = split == "train", split == "test"
    forest = RandomForestClassifier(n_estimators=300, random_state=seed).fit(stats[train], labels[train])
    return float((forest.predict(stats[test]) == labels[test]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path, help="a prepared set (data/prepared)")
    parser.add_argument("out", type=Path, help="the directory to write (not the prepared set itself)")
    args = parser.parse_args()
    if args.out.resolve() == args.prepared.resolve():
        raise SystemExit(f"{args.out}: write the copy to another directory than the prepared set")
    prepared = load_prepared(args.prepared)
    images = np.asarray(prepared.images)
    standardized = standardize_grey_levels(images)
    labels, split = prepared.manifest["label"].to_numpy(), prepared.manifest["split"].to_numpy()
    majority = np.bincount(labels[split == "test"]).max() / (split == "test").sum()
    print(f"grey-level statistics alone (mean, std, 5th / 95th percentile; random forest): test top-1 "
          f"{stats_top1(images, labels, split):.3f} on the original, {stats_top1(standardized, labels, split):.3f} "
          f"standardized (the largest class: {majority:.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / IMAGES) as tmp:
        np.save(tmp, standardized)
    for path in args.prepared.iterdir():
        if path.is_file() and path.name != IMAGES:
            with atomic_path(args.out / path.name) as tmp:
                shutil.copyfile(path, tmp)
    print(f"{args.out}: {len(prepared.manifest)} images standardized to mean {GREY_MEAN:g}, std {GREY_STD:g}")


if __name__ == "__main__":
    main()
