"""A fresh clone's `make run` (install from the committed lock, then the whole default
pipeline) leaves `git status` clean: every output hash in the committed dvc.lock, and every
committed metric and plot, is what a new machine of this kind makes. Slow (about 12 minutes
on 2 cores: the install and the default pipeline): `make test-all` or `pytest -m slow`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_fresh_clones_make_run_leaves_git_status_clean(tmp_path):
    head = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    if head.strip():
        pytest.skip("the working tree has uncommitted changes: the clone would test HEAD, not them; commit first")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(["make", "run"], cwd=clone, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"make run failed in a fresh clone:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"a fresh clone's `make run` leaves the repository dirty:\n{status}"
