"""The ``prepare`` stage's work: a folder of labelled micrographs -> a split, model-ready set.

Writes to ``out_dir``:
- ``images.npy``: uint8 (N, S, S) in manifest order (``np.load(..., mmap_mode="r")``);
- ``manifest.parquet``: id, path, sha256 (of the stored image), pixel_hash (xxh3-128 of
  the decoded pixels: equal for exact duplicates), label, class_name, split, group,
  width, height, bar_rows, phash;
- ``classes.json``: the ordered class names (``label`` indexes it);
- ``report.json``: scanned, kept, skipped [{path, reason}], duplicates
  [{path, duplicate_of}], label_conflicts [{paths, classes}] (the same pixels in two
  class folders: none of them is kept), single_image_classes, few_groups (val/test
  classes with fewer than MIN_GROUPS independent groups), per-class and per-split
  counts, grouping figures.
Bad files are skipped with a logged one-line reason; :class:`PrepareError` is raised
only when the layout is ambiguous, or no usable data or fewer than 2 classes remain.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multifusion.core.errors import UserError
from multifusion.core.config import DataConfig
from multifusion.data.ingest import Record, prepare_files
from multifusion.data.layout import LayoutError, Scan, check_train_classes, scan_folder
from multifusion.data.split import (MIN_GROUPS, SPLITS, assign_splits, connected_groups, near_duplicate_pairs,
                                    pattern_pairs)
from multifusion.core.atomic import atomic_path
from multifusion.core.json_files import write_json

log = logging.getLogger("multifusion.prepare")


class PrepareError(UserError, RuntimeError):
    """The folder gives no usable data set; the message says why and what to do."""


def _keep_unique(records: list[Record], classes: list[str]) -> tuple[list[int], list[dict[str, str]], list[dict[str, list[str]]]]:
    """Indices kept (the first of each pixel-identical set), the duplicates dropped, and the
    label conflicts: pixel-identical files in different class folders, none of them kept."""
    same: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        same.setdefault(record.pixel_hash, []).append(i)
    kept, duplicates, conflicts = [], [], []
    for members in same.values():
        labels = sorted({classes[i] for i in members})
        if len(labels) > 1:
            conflicts.append({"paths": [records[i].path for i in members], "classes": labels})
            log.warning("label conflict: the same image is in %s (%s); none kept: move it into one class folder",
                        " and ".join(labels), ", ".join(records[i].path for i in members))
            continue
        kept.append(members[0])
        duplicates += [(i, {"path": records[i].path, "duplicate_of": records[members[0]].path}) for i in members[1:]]
    duplicates = [dup for _, dup in sorted(duplicates, key=lambda d: d[0])]  # in scan order
    for dup in duplicates:
        log.info("duplicate %s: same pixels as %s; kept once", dup["path"], dup["duplicate_of"])
    return sorted(kept), duplicates, conflicts


def thin_classes(manifest: pd.DataFrame, ratios: dict[str, float]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Classes with a single image (they can only be in train), and per val/test split the
    classes with fewer than MIN_GROUPS independent groups there, each logged once."""
    counts = manifest["class_name"].value_counts()
    single = sorted(c for c, n in counts.items() if n == 1)
    if single:
        log.warning("class(es) %s have a single image: it can only be in train, so val and test cannot score them; "
                    "add images of these classes", ", ".join(single))
    groups = manifest.groupby(["split", "class_name"])["group"].nunique()
    few: dict[str, dict[str, int]] = {}
    for split in ("val", "test"):
        if ratios[split] <= 0 and split not in set(manifest["split"]):
            continue
        few[split] = {c: int(groups.get((split, c), 0)) for c in sorted(counts.index)
                      if groups.get((split, c), 0) < MIN_GROUPS}
        if few[split]:
            shown = ", ".join(f"{c}: {n}" for c, n in few[split].items())
            log.warning("%s holds fewer than %d independent groups for %d of %d classes (%s): its per-class scores%s "
                        "are noise; add images of these classes or raise data.split.%s", split, MIN_GROUPS,
                        len(few[split]), len(counts), shown, " and the temperature fitted on it" if split == "val" else "", split)
    return single, few


Kept = list[tuple[Record, str, str | None]]  # (record, class name, given split) of each kept file


def _scan(root: Path) -> Scan:
    """The labelled files under ``root``, each passed-over path logged."""
    try:
        scan = scan_folder(root)
    except (FileNotFoundError, NotADirectoryError, LayoutError) as err:
        raise PrepareError(str(err)) from None
    for item in scan.skipped:
        log.warning("skip %s: %s", item["path"], item["reason"])
    if not scan.files:
        raise PrepareError(f"{root}: no image files found in <root>/<Class>/ or <root>/{{train,val,test}}/<Class>/; "
                           "point data.root at a folder of class sub-folders")
    return scan


def _ingest(root: Path, scan: Scan, data: DataConfig, progress: bool) -> tuple[Kept, list[dict[str, str]], list[dict[str, str]],
                                                                   list[dict[str, list[str]]]]:
    """Ingest every scanned file: the usable unique ones, the skipped (scan's and bad
    files), the exact duplicates dropped and the label conflicts."""
    skipped = list(scan.skipped)
    records = list(prepare_files([p for p, _, _ in scan.files], data, progress=progress))
    good = []
    for (path, class_name, split), record in zip(scan.files, records):
        if record.error:
            skipped.append({"path": path, "reason": record.error})
            log.warning("skip %s: %s", path, record.error)
        else:
            good.append((record, class_name, split))
    kept_idx, duplicates, conflicts = _keep_unique([r for r, _, _ in good], [c for _, c, _ in good])
    kept = [good[i] for i in kept_idx]
    try:  # again after decoding: a class whose train/ files were all unusable
        check_train_classes(root, [(c, s) for _, c, s in kept])
    except LayoutError as err:
        raise PrepareError(f"{err} (its train/ files were skipped: see the messages above)") from None
    return kept, skipped, duplicates, conflicts


def _classes(root: Path, scan: Scan, good: Kept, n_skipped: int) -> tuple[list[str], list[str]]:
    """The ordered classes with usable images, and those found but dropped."""
    found_classes = sorted({c for _, c, _ in scan.files})
    classes = sorted({c for _, c, _ in good})
    dropped = sorted(set(found_classes) - set(classes))
    for lost in dropped:
        log.warning("class %s dropped: none of its files could be used (see report.json 'skipped' and 'label_conflicts')", lost)
    if not good:
        raise PrepareError(f"{root}: no usable images ({n_skipped} skipped, see the messages above)")
    if len(classes) < 2:
        raise PrepareError(f"{root}: only {len(classes)} class with usable images ({', '.join(classes)}); "
                           "a classifier needs at least 2 class folders")
    return classes, dropped


def _manifest(root: Path, good: Kept, classes: list[str], data: DataConfig, seed: int) -> pd.DataFrame:
    """Group near-copies, split, and tabulate the kept files (manifest order = scan order)."""
    labels = np.array([classes.index(c) for _, c, _ in good], dtype=np.int64)  # (N,)
    hashes = np.array([r.phash for r, _, _ in good], dtype=np.uint64)  # (N,)
    names = [Path(r.path).name for r, _, _ in good]
    pairs = near_duplicate_pairs(hashes, data.near_duplicate_bits) + pattern_pairs(names, data.group_pattern)
    groups = connected_groups(len(good), pairs)  # (N,)
    given = [s for _, _, s in good]
    splits = assign_splits(labels, groups, _ratios(data), seed, given if any(given) else None)
    return pd.DataFrame({
        "id": [Path(r.path).relative_to(root).as_posix() for r, _, _ in good],
        "path": [r.path for r, _, _ in good],
        "sha256": [r.sha256 for r, _, _ in good],
        "pixel_hash": [r.pixel_hash for r, _, _ in good],
        "label": labels,
        "class_name": [c for _, c, _ in good],
        "split": splits,
        "group": groups,
        "width": [r.width for r, _, _ in good],
        "height": [r.height for r, _, _ in good],
        "bar_rows": [r.bar_rows for r, _, _ in good],
        "phash": [f"{r.phash:016x}" for r, _, _ in good],
    })


def _ratios(data: DataConfig) -> dict[str, float]:
    return {"train": data.split.train, "val": data.split.val, "test": data.split.test}


def _counts(manifest: pd.DataFrame) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Images per class, and per split per class."""
    classes = {c: int(n) for c, n in sorted(Counter(manifest["class_name"]).items())}
    splits = {s: {c: int(n) for c, n in sorted(Counter(manifest.loc[manifest["split"] == s, "class_name"]).items())}
              for s in SPLITS}
    return classes, splits


def _grouping_figures(manifest: pd.DataFrame) -> dict[str, int]:
    """The near-duplicate grouping figures of the report."""
    group_splits = manifest.groupby("group")["split"].nunique()
    group_sizes = manifest["group"].value_counts()
    return {
        "groups": int(manifest["group"].nunique()),
        "near_duplicate_groups": int((group_sizes > 1).sum()),
        "largest_group": int(group_sizes.max()),
        "groups_across_splits": int((group_splits > 1).sum()),
        "infobar_cropped": int((manifest["bar_rows"] > 0).sum()),
    }


def prepare_dataset(root: str | Path, out_dir: str | Path, data: DataConfig, seed: int,
                    progress: bool = True) -> dict[str, Any]:
    """Scan, decode, de-duplicate, group and split ``root``; write ``out_dir``; return the report.
    Every byte written depends on the inputs only (no timings: see multifusion.core.timings)."""
    root, out_dir = Path(root), Path(out_dir)
    scan = _scan(root)
    good, skipped, duplicates, conflicts = _ingest(root, scan, data, progress)
    classes, dropped = _classes(root, scan, good, len(skipped))
    manifest = _manifest(root, good, classes, data, seed)
    images = np.stack([r.image for r, _, _ in good])  # (N, S, S) uint8

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "images.npy") as tmp:  # each file whole or not at all
        np.save(tmp, images)
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    write_json(out_dir / "classes.json", classes)
    class_counts, split_counts = _counts(manifest)
    report = {
        "root": str(root),
        "scanned": len(scan.files) + sum(1 for s in scan.skipped if Path(s["path"]).is_file()),
        "kept": len(manifest),
        "skipped": skipped,
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "classes": class_counts,
        "dropped_classes": dropped,
        "splits": split_counts,
        "given_splits": bool(any(s for _, _, s in good)),
        **_grouping_figures(manifest),
        "image_size": data.image_size,
    }
    report["single_image_classes"], report["few_groups"] = thin_classes(manifest, _ratios(data))
    write_json(out_dir / "report.json", report)
    log.info("prepared %d of %d files, %d classes -> %s", report["kept"], report["scanned"], len(classes), out_dir)
    return report
