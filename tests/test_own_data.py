"""A new user's first run on their own micrographs: class folders with no curated text, no
LLM, `dvc exp run -S data.root=/abs/folder` in a fresh repository. It must train without
an API key (label descriptions, listed in metrics/llm.json) and synthesize nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_pipeline import _run, make_tiny_repo

CLASSES = ["Hollow_spheres", "Nanoflakes", "Rod_bundles"]  # none curated in prompts/curated


def own_folder(root: Path, per_class: int = 10, size: int = 40) -> Path:
    """<root>/<Class>/*.png: small grey images, a different texture per class."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            wave = np.sin((xx if c % 2 else yy) * (c + 1) * 0.5 + rng.uniform(0, 6))  # (S, S)
            image = 120 + 70 * wave + rng.normal(0, 12, (size, size))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / f"shot_{i:02d}.png")
    return root


@pytest.mark.slow  # a whole `dvc exp run` (test_pipeline keeps one end-to-end smoke in the default suite)
def test_own_data_first_run_without_llm_and_without_synthesis(tmp_path, repo_root):
    repo = make_tiny_repo(tmp_path, repo_root)
    synthesize_lock = repo / "synthesize" / "dvc.lock"  # the committed default run's, if copied
    committed = synthesize_lock.read_text() if synthesize_lock.exists() else None
    data = own_folder(tmp_path / "own")
    out = _run(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", f"data.root={data.resolve()}")

    assert "synthesize" not in out.split("Running stage 'prepare'")[0]
    assert not (repo / "data" / "raw" / "synthetic").exists()  # no synthetic image made
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "synthesize" not in lock["stages"] and "data/raw/synthetic" not in (repo / "dvc.lock").read_text()
    assert (synthesize_lock.read_text() if synthesize_lock.exists() else None) == committed  # synthesize never ran

    llm = json.loads((repo / "metrics" / "llm.json").read_text())
    assert llm["fallback_classes"] == CLASSES and llm["requests_sent"] == 0
    assert "no curated text and no LLM is configured" in out  # the one warning line
    table = pd.read_parquet(repo / "data" / "descriptions.parquet")
    assert set(table["provider"]) == {"label"} and set(table["class_name"]) == set(CLASSES)
    model = json.loads((repo / "models" / "hnf" / "config.json").read_text())
    assert model["classes"] == CLASSES
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0
