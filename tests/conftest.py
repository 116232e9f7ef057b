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
    from multifusion.config import load_config

    def _make(overrides: dict[str, Any] | None = None):
        return load_config(REPO_ROOT / "params.yaml", overrides)

    return _make
