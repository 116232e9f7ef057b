"""End to end: the whole DVC pipeline on a tiny configuration, then `dvc exp run -S
hnf.layers=4`, as a user runs them. A copy of the repository's pipeline in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "synthesize": {"total": 100, "min_per_class": 8, "width": 160, "height": 120},
    "data": {"image_size": 32},
    "text": {"steps": 5, "hidden": 32, "intermediate": 64, "heads": 2, "vocab_size": 300, "max_length": 48},
    "hnf": {"dim": 32},
    "train": {"epochs": 1, "batch_size": 16},
}


TINY_DEFAULT_LAYERS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["hnf"]["layers"]


def _run(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _tiny_params(repo_root: Path) -> dict:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    for shift, severities in params["robustness"].items():  # one severity per shift
        if isinstance(severities, list):
            params["robustness"][shift] = severities[:1]
    return params


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def make_tiny_repo(tmp_path: Path, repo_root: Path) -> Path:
    """A git + DVC repository in tmp_path/repo: the pipeline files and the tiny params, committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "synthesize", "stages", "src", "prompts"):
        src = repo_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(repo_root), sort_keys=False))
    (repo / ".gitignore").write_text("/data/\n/models/\n/dvclive/\n/checkpoints/\n")
    _run(repo, *GIT, "init", "-q")
    _run(repo, sys.executable, "-m", "dvc", "init", "-q")
    _run(repo, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    _run(repo, *GIT, "add", "-A")
    _run(repo, *GIT, "commit", "-qm", "tiny pipeline")  # `dvc exp run` needs a commit
    return repo


def test_pipeline_end_to_end_then_exp_run_with_four_layers(tmp_path, repo_root):
    repo = make_tiny_repo(tmp_path, repo_root)
    out = _run(repo, sys.executable, "-m", "dvc", "repro")
    assert "Running stage 'synthesize/dvc.yaml:synthesize'" in out  # from nothing: the default data is made first
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    for key in ("top1", "top2", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "ece"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert json.loads((repo / "metrics" / "llm.json").read_text())["requests_sent"] == 0  # curated: offline
    assert (repo / "metrics" / "robustness.json").is_file()
    assert "up to date" in _run(repo, sys.executable, "-m", "dvc", "repro").lower()  # second run: a no-op

    _run(repo, *GIT, "add", "-A")
    _run(repo, *GIT, "commit", "-qm", "lock")
    out = _run(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "hnf.layers=4")
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    config = json.loads((repo / "models" / "hnf" / "config.json").read_text())
    assert config["config"]["hnf"]["layers"] == 4
    shown = json.loads(_run(repo, sys.executable, "-m", "dvc", "exp", "show", "--json"))
    layers = [
        exp["data"]["params"]["params.yaml"]["data"]["hnf"]["layers"]
        for commit in shown
        for exp in [commit, *[e for run in commit.get("experiments") or [] for e in run["revs"]]]
        if exp.get("data")
    ]
    assert 4 in layers and TINY_DEFAULT_LAYERS in layers
