"""The images self-supervised pretraining may learn from: the train split (labels ignored)
plus an optional folder of unlabelled micrographs (``data.unlabeled``), never a val or test
image or a near-copy of one.

    pool = pretrain_pool(load_prepared("data/prepared"), cfg.data.unlabeled, cfg.data)
    pool.images        # uint8 (N, S, S)
    pool.report        # counts, skipped files, excluded files and why

The unlabelled files go through ``prepare``'s own ingest (``ingest.prepare_files``: decode,
info-bar crop, square, resize, hashes), so the trunk sees them exactly as the classifier
sees labelled ones. A candidate (train row or unlabelled file) is dropped when it is an
exact copy of a val or test image (same decoded pixels or same stored image, sha256) or a
near-copy (perceptual hashes within ``data.near_duplicate_bits`` bits: how ``prepare``
groups near-copies, see ``split``). Exact copies among the candidates are kept once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifusion.core.config import DataConfig
from multifusion.core.errors import UserError
from multifusion.data.dataset import Prepared
from multifusion.data.ingest import prepare_files
from multifusion.data.layout import IMAGE_EXTENSIONS

log = logging.getLogger("multifusion.pretrain_image")

HELD_OUT = ("val", "test")
NEEDED_COLUMNS = ("sha256", "pixel_hash", "phash", "split", "id")


class UnlabeledError(UserError, ValueError):
    """data.unlabeled or the prepared set cannot feed pretraining; the message names the fix."""


@dataclass
class PretrainPool:
    """The images pretraining learns from, and what was left out."""

    images: np.ndarray                         # uint8 (N, S, S)
    sha256: list[str]                          # of each stored image (what the trunk sees)
    sources: list[str]                         # "train:<manifest id>" | "unlabeled:<path>"
    report: dict[str, Any] = field(default_factory=dict)


def unlabeled_files(folder: str | Path) -> list[str]:
    """Every image file under ``folder`` (any nesting, hidden entries skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnlabeledError(f"{folder}: data.unlabeled is not a folder; point it at a folder of micrographs or set it to null")
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(top, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def hamming_to_nearest(hashes: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For uint64 hashes (N,) against reference hashes (M,): (the smallest Hamming distance
    (N,), the index of that reference (N,)); 65 and -1 when there is no reference."""
    if len(reference) == 0:
        return np.full(len(hashes), 65), np.full(len(hashes), -1)
    bits = np.bitwise_count(hashes[:, None] ^ reference[None, :])  # (N, M)
    nearest = bits.argmin(axis=1)
    return bits[np.arange(len(hashes)), nearest].astype(np.int64), nearest


def _phashes(values: Any) -> np.ndarray:
    """The manifest's hex pHash strings (or ints) as uint64 (N,)."""
    return np.array([int(v, 16) if isinstance(v, str) else int(v) for v in values], dtype=np.uint64)


def pretrain_pool(prepared: Prepared, unlabeled: str | Path | None, data: DataConfig, progress: bool = False) -> PretrainPool:
    """The train split's images plus ``unlabeled``'s files, less every exact or near copy of a
    val/test image (see the module docstring), each candidate once."""
    manifest = prepared.manifest
    missing = [c for c in NEEDED_COLUMNS if c not in manifest.columns]
    if missing:
        raise UnlabeledError(f"the prepared manifest lacks {', '.join(missing)}; re-run `dvc repro prepare`")
    held = manifest["split"].isin(HELD_OUT).to_numpy()
    held_ids = manifest["id"].astype(str).to_numpy()[held]
    held_split = manifest["split"].astype(str).to_numpy()[held]
    held_sha = dict(zip(manifest["sha256"][held], range(held.sum())))
    held_pixels = dict(zip(manifest["pixel_hash"][held], range(held.sum())))
    held_phash = _phashes(manifest["phash"][held])

    # candidates: (source, image, sha256, pixel_hash, phash)
    train = np.flatnonzero(manifest["split"].to_numpy() == "train")
    candidates = [(f"train:{manifest['id'].iat[i]}", prepared.images[i], manifest["sha256"].iat[i], manifest["pixel_hash"].iat[i],
                   int(_phashes([manifest["phash"].iat[i]])[0])) for i in train]
    skipped: list[dict[str, str]] = []
    paths = unlabeled_files(unlabeled) if unlabeled is not None else []
    for record in prepare_files(paths, data, progress=progress):
        if record.error:
            skipped.append({"path": record.path, "reason": record.error})
            log.warning("skip %s: %s", record.path, record.error)
        else:
            candidates.append((f"unlabeled:{record.path}", record.image, record.sha256, record.pixel_hash, record.phash))

    distance, nearest = hamming_to_nearest(np.array([c[4] for c in candidates], dtype=np.uint64), held_phash)
    kept, excluded, seen, duplicates = [], [], set(), 0
    for (source, image, sha, pixels, _), bits, near in zip(candidates, distance, nearest):
        twin = held_pixels.get(pixels, held_sha.get(sha))
        if twin is not None or bits <= data.near_duplicate_bits:
            which = twin if twin is not None else int(near)
            kind = "exact copy" if twin is not None else f"near-copy ({int(bits)} bits)"
            excluded.append({"source": source, "reason": f"{kind} of {held_split[which]} image {held_ids[which]}"})
            continue
        if sha in seen or pixels in seen:
            duplicates += 1
            continue
        seen |= {sha, pixels}
        kept.append((source, image, sha))
    for item in excluded:
        log.info("not pretrained on %s: %s", item["source"], item["reason"])
    if len(kept) < 2:
        raise UnlabeledError(f"only {len(kept)} image(s) left to pretrain on; add micrographs (data.unlabeled) or set pretrain.enabled: false")
    size = data.image_size
    images = np.stack([np.asarray(image) for _, image, _ in kept]).astype(np.uint8)  # (N, S, S)
    if images.shape[1:] != (size, size):
        raise UnlabeledError(f"the prepared images are {images.shape[1]} px but data.image_size is {size}; re-run `dvc repro prepare`")
    report = {
        "train_images": int(sum(s.startswith("train:") for s, _, _ in kept)),
        "unlabeled_files": len(paths),
        "unlabeled_images": int(sum(s.startswith("unlabeled:") for s, _, _ in kept)),
        "skipped": skipped,
        "excluded": excluded,
        "duplicates": duplicates,
    }
    return PretrainPool(images, [sha for _, _, sha in kept], [s for s, _, _ in kept], report)
