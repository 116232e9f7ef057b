"""The prepared data set as models consume it: loading, one normalisation, augmentation.

``prepare`` writes ``images.npy`` (uint8 (N, S, S), manifest order), ``manifest.parquet``
and ``classes.json``. Everything that feeds a model (train, evaluate, predict, robustness)
goes through :func:`to_model_input`, so the pixel normalisation lives in one place.

Augmentation runs on whole batches on the training device (GPU-friendly: no per-image
Python loop, no PIL), with an explicit ``torch.Generator`` so a run is reproducible:

    x = to_unit(u8)                        # (B, 1, S, S) in [0, 1]
    x = augment_batch(x, cfg.train.augment, gen)
    x = normalize(x)                       # what the model sees
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from multifusion.core.config import AugmentConfig
from multifusion.data.split import SPLITS

IMAGES = "images.npy"
MANIFEST = "manifest.parquet"
CLASSES = "classes.json"

# Grey micrographs: map [0, 1] to roughly zero mean, unit spread.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


@dataclass
class Prepared:
    """The output of ``prepare``: images (memory-mapped), manifest rows, class names."""

    images: np.ndarray          # (N, S, S) uint8, mmap
    manifest: pd.DataFrame      # N rows, manifest order, columns id, label, class_name, split, ...
    classes: list[str]          # ordered class names; label i is classes[i]

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices (into images and manifest) of one split, in manifest order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def labels(self, indices: np.ndarray | None = None) -> np.ndarray:
        labels = self.manifest["label"].to_numpy().astype(np.int64)
        return labels if indices is None else labels[indices]


def load_prepared(directory: str | Path) -> Prepared:
    """Open ``data/prepared``: ``images.npy`` via ``mmap_mode="r"``, the manifest, the classes."""
    directory = Path(directory)
    for name in (IMAGES, MANIFEST, CLASSES):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; run `dvc repro prepare` first")
    images = np.load(directory / IMAGES, mmap_mode="r")
    manifest = pd.read_parquet(directory / MANIFEST)
    classes = json.loads((directory / CLASSES).read_text())
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{directory / IMAGES}: expected uint8 (N, S, S), got {images.dtype} {images.shape}; rerun prepare")
    if len(manifest) != images.shape[0]:
        raise ValueError(
            f"{directory / MANIFEST}: {len(manifest)} rows but {IMAGES} holds {images.shape[0]} images; rerun prepare"
        )
    missing = {"label", "split"} - set(manifest.columns)
    if missing:
        raise ValueError(f"{directory / MANIFEST}: missing columns {sorted(missing)}; rerun prepare")
    labels = manifest["label"].to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"{directory / MANIFEST}: labels outside 0..{len(classes) - 1} of {CLASSES}; rerun prepare")
    return Prepared(images=images, manifest=manifest, classes=list(classes))


class SplitDataset(Dataset):
    """One split as (image uint8 (S, S), label) pairs; augmentation happens per batch later."""

    def __init__(self, prepared: Prepared, split: str):
        self.images = prepared.images
        self.indices = prepared.split_indices(split)
        self.targets = prepared.labels(self.indices)

    def __getstate__(self) -> dict:
        """DataLoader workers reopen the memory map instead of receiving a copy of every image."""
        state = dict(self.__dict__)
        filename = getattr(self.images, "filename", None)
        if filename is not None:
            state["images"] = str(filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["images"], str):
            state["images"] = np.load(state["images"], mmap_mode="r")
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.images[self.indices[i]]))  # (S, S) uint8
        return image, int(self.targets[i])

    def __getitems__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched fetch (one fancy-index read of the mmap instead of B small ones)."""
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        order = np.argsort(rows)                       # mmap reads are faster in file order
        batch = np.empty((len(rows),) + self.images.shape[1:], dtype=np.uint8)
        batch[order] = self.images[rows[order]]
        return torch.from_numpy(batch), torch.from_numpy(self.targets[np.asarray(items, dtype=np.int64)])


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``DataLoader`` collate for :meth:`SplitDataset.__getitems__` (already batched)."""
    return batch


def to_unit(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) or (B, 1, S, S) -> float32 (B, 1, S, S) in [0, 1]."""
    x = torch.from_numpy(np.array(images_u8)) if isinstance(images_u8, np.ndarray) else images_u8  # copy: mmap is read-only
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images of shape (B, S, S) or (B, 1, S, S), got {tuple(x.shape)}")
    return x.float() / 255.0


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (B, 1, S, S) -> the model's input scale."""
    return (x - PIXEL_MEAN) / PIXEL_STD


def to_model_input(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) -> float32 (B, 1, S, S): the one normalisation used everywhere."""
    return normalize(to_unit(images_u8))


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def random_resized_crop(x: torch.Tensor, min_area: float, gen: torch.Generator) -> torch.Tensor:
    """Per image: a square crop of area fraction in [min_area, 1] at a random place, resized back.

    x: (B, 1, S, S). One batched ``grid_sample`` (bilinear), so it runs on any device.
    """
    B, device = x.shape[0], x.device
    side = _uniform(B, min_area**0.5, 1.0, gen, device)            # (B,) crop side / image side
    cx = _uniform(B, -1.0, 1.0, gen, device) * (1.0 - side)        # centre, in [-1, 1] coords
    cy = _uniform(B, -1.0, 1.0, gen, device) * (1.0 - side)
    theta = torch.zeros(B, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def burn_info_bars(x: torch.Tensor, probability: float, gen: torch.Generator) -> torch.Tensor:
    """x (B, 1, S, S) in [0, 1] -> the same, each image with ``probability`` given an instrument
    info bar over its bottom rows: what an uncropped micrograph shows when the info-bar crop of
    ``prepare`` misses it.

    The bar covers 4-20% of the rows, black or white, with "text" of the other shade (half the
    pixels of its middle rows, over a random 30-70% of the width from the left) and a scale bar
    (a line a quarter of the bar thick, from 75-90% of the width to the edge). Random in height,
    shade and extent, so it is never the robustness stage's one rendered bar.
    """
    B, S, device = x.shape[0], x.shape[-1], x.device
    chosen = torch.rand(B, generator=gen, device=device) < probability  # (B,)
    heights = torch.randint(max(1, round(0.04 * S)), max(1, round(0.2 * S)) + 1, (B,), generator=gen, device=device)  # (B,)
    shade = (torch.rand(B, generator=gen, device=device) < 0.5).to(x.dtype)  # (B,) 0: black bar, 1: white bar
    text_end = _uniform(B, 0.3, 0.7, gen, device) * S  # (B,) columns of text
    scale_start = _uniform(B, 0.75, 0.9, gen, device) * S  # (B,) first column of the scale bar
    glyphs = torch.rand(B, S, S, generator=gen, device=device) < 0.5  # (B, S, S)
    offset = torch.arange(S, device=device)[None, :] - (S - heights)[:, None]  # (B, S) row index inside the bar
    cols = torch.arange(S, device=device)[None, None, :]  # (1, 1, S)
    h = heights[:, None]  # (B, 1)
    thick = (h // 4).clamp(min=1)
    text_rows = (offset >= h // 4) & (offset < h - h // 4)  # (B, S)
    scale_rows = (offset >= h // 2 - thick // 2) & (offset < h // 2 - thick // 2 + thick)  # (B, S)
    text = text_rows[:, :, None] & (cols < text_end[:, None, None]) & glyphs  # (B, S, S)
    scale = scale_rows[:, :, None] & (cols >= scale_start[:, None, None]) & (cols < S - 1)  # (B, S, S)
    bar = torch.where(text | scale, 1 - shade[:, None, None], shade[:, None, None])  # (B, S, S)
    in_bar = (offset >= 0) & chosen[:, None]  # (B, S)
    return torch.where(in_bar[:, None, :, None], bar[:, None], x)


def augment_batch(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Micrograph augmentation on a batch x (B, 1, S, S) in [0, 1]; returns the same shape.

    An info bar left in (before the turns, so it lands on every side, as the eight test-time
    views show it), flips and 90-degree rotations (micrographs have no canonical orientation),
    a random resized crop (magnification change), brightness/contrast jitter and Gaussian
    noise (detector settings). Random draws come from ``gen`` (on x's device); an augmentation
    that is off draws nothing.
    """
    B, device = x.shape[0], x.device
    if aug.info_bar > 0:
        x = burn_info_bars(x, aug.info_bar, gen)
    if aug.flips:
        flip_h = torch.rand(B, generator=gen, device=device) < 0.5
        flip_v = torch.rand(B, generator=gen, device=device) < 0.5
        x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
        x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if aug.rot90 and x.shape[-1] == x.shape[-2]:
        turns = torch.randint(0, 4, (B,), generator=gen, device=device)
        rotated = x.clone()
        for k in (1, 2, 3):
            rotated = torch.where((turns == k)[:, None, None, None], torch.rot90(x, k, dims=(-2, -1)), rotated)
        x = rotated
    if aug.crop_scale < 1.0:
        x = random_resized_crop(x, aug.crop_scale, gen)
    if aug.brightness > 0:
        x = x + _uniform(B, -aug.brightness, aug.brightness, gen, device)[:, None, None, None]
    if aug.contrast > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)                   # (B, 1, 1, 1)
        factor = _uniform(B, 1.0 - aug.contrast, 1.0 + aug.contrast, gen, device)[:, None, None, None]
        x = (x - mean) * factor + mean
    if aug.noise > 0:
        sigma = _uniform(B, 0.0, aug.noise, gen, device)[:, None, None, None]
        x = x + sigma * torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
    return x.clamp(0.0, 1.0)
