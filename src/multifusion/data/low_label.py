"""The low-label regime: k labelled groups per class in the train split, val and test unchanged.

    keep = low_label_mask(manifest, per_class=10, seed=0)             # bool (N,)
    counts = write_low_label(prepared_dir, out_dir, per_class=10, seed=0)

k counts groups, not files: the manifest's ``group`` (near-copies by perceptual hash, files
tied by ``data.group_pattern``: crops of one micrograph) is one label's worth of evidence,
so a chosen group brings all its train files and ten crops of one micrograph count once.
Where every file is its own group this is k files per class. A group belongs to the class
of most of its train files (as ``split.assign_splits`` stratifies). A class with k groups or
fewer keeps all of them. The draw depends on the seed only (not on the models trained), so
every model and training seed sees the same labels; val and test rows are kept as they
are, image for image, in manifest order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from multifusion.core.atomic import atomic_path
from multifusion.data.dataset import IMAGES, MANIFEST, load_prepared


def low_label_mask(manifest: pd.DataFrame, per_class: int, seed: int) -> np.ndarray:
    """bool (N,): every val/test row, and the train rows of at most ``per_class`` groups per class."""
    if per_class < 1:
        raise ValueError(f"labels per class must be at least 1, got {per_class}")
    split = manifest["split"].to_numpy()
    keep = split != "train"
    train = manifest[split == "train"]
    groups = train["group"].astype(str) if "group" in train.columns else train.index.astype(str).to_series(index=train.index)
    majority = train.groupby(groups)["label"].agg(lambda s: int(np.bincount(s.to_numpy()).argmax()))  # group -> class
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted(majority.unique()):
        names = np.array(sorted(majority.index[majority == label]))  # sorted: the draw does not depend on row order
        chosen |= set(names if len(names) <= per_class else rng.choice(names, per_class, replace=False))
    keep[np.flatnonzero(split == "train")[groups.isin(chosen).to_numpy()]] = True
    return keep


def write_low_label(prepared_dir: str | Path, out_dir: str | Path, per_class: int, seed: int) -> dict[str, int]:
    """Write ``out_dir``, a prepared set holding :func:`low_label_mask`'s rows of ``prepared_dir``
    (images.npy, manifest.parquet, and every other file copied); -> rows per split."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    if out_dir.resolve() == prepared_dir.resolve():
        raise ValueError(f"{out_dir}: the output must be another directory than the prepared set it subsamples")
    prepared = load_prepared(prepared_dir)
    keep = low_label_mask(prepared.manifest, per_class, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / IMAGES) as tmp:
        np.save(tmp, np.asarray(prepared.images)[keep])
    with atomic_path(out_dir / MANIFEST) as tmp:
        prepared.manifest[keep].reset_index(drop=True).to_parquet(tmp, index=False)
    for path in prepared_dir.iterdir():
        if path.is_file() and path.name not in (IMAGES, MANIFEST):
            with atomic_path(out_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
    return {str(k): int(v) for k, v in prepared.manifest[keep]["split"].value_counts().sort_index().items()}
