"""Shared test fixtures. Tests build their Config from the repository's params.yaml
(the only place defaults live) plus dotted overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def make_config():
    """``make_config({"hnf.layers": 2})`` -> Config from params.yaml with overrides."""
    from multifusion.core.config import load_config

    def _make(overrides: dict[str, Any] | None = None):
        return load_config(REPO_ROOT / "params.yaml", overrides)

    return _make


@pytest.fixture
def make_prepared(tmp_path):
    """``make_prepared(per_class={"train": 8, "val": 4, "test": 4}, classes=3, size=16)`` ->
    a tiny ``data/prepared`` directory (images.npy, manifest.parquet, classes.json) of
    learnable patterned uint8 images: class c shows stripes of frequency c + 1 plus noise."""
    import json

    import numpy as np
    import pandas as pd

    def _make(per_class: dict[str, int] | None = None, classes: int = 3, size: int = 16, seed: int = 0, name: str = "prepared") -> Path:
        per_class = per_class or {"train": 8, "val": 4, "test": 4}
        rng = np.random.default_rng(seed)
        grid = np.arange(size) / size
        images, rows = [], []
        for split, count in per_class.items():
            for c in range(classes):
                for _ in range(count):
                    stripes = np.sin(2 * np.pi * (c + 1) * grid + rng.uniform(0, 2 * np.pi))    # (S,)
                    image = 128 + 80 * stripes[None, :] + rng.normal(0, 20, (size, size))       # (S, S)
                    if c % 2:
                        image = image.T
                    images.append(np.clip(image, 0, 255).astype(np.uint8))
                    i = len(rows)
                    rows.append({"id": f"img{i:05d}", "path": f"c{c}/img{i:05d}.png", "sha256": f"{i:064x}", "label": c,
                                 "class_name": f"class_{c}", "split": split, "group": f"img{i:05d}"})
        out = tmp_path / name
        out.mkdir(parents=True)
        np.save(out / "images.npy", np.stack(images))
        pd.DataFrame(rows).to_parquet(out / "manifest.parquet", index=False)
        (out / "classes.json").write_text(json.dumps([f"class_{c}" for c in range(classes)]))
        return out

    return _make
