"""A tiny git + DVC repository of the product's two pipelines (root and comparison), for the
tests of experiments: the DVC queue (tests/test_queue.py) and sharing over SSH
(tests/test_ssh_remote.py). Built on test_pipeline's tiny configuration, smaller still:
one training epoch, no test-time views, two models at one seed in the comparison.

    repo = make_experiment_repo(tmp_path, repo_root)          # committed, nothing run yet
    dvc(repo, "repro", "embed_text")                          # the text features the comparison needs
    metrics = exp_metrics(json.loads(dvc(repo, "exp", "show", "--json")))
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from test_pipeline import GIT, make_tiny_repo

# On top of test_pipeline.TINY: one epoch, one view at test, a tiny LM from scratch, the smallest
# comparison with a report.
SMALLER = {
    "train": {"epochs": 1},
    "evaluate": {"tta": False},
    "text": {"base_model": None, "steps": 3, "head_steps": 0, "lr": 0.001, "warmup_steps": 1},  # a from-scratch LM: seconds, not a minute
    "compare": {"models": ["multifusion", "resnet18"], "seeds": [42]},
}


def env(repo: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell has in ``repo``: the venv's tools first, the repository's
    own src/ imported, offline, one torch thread unless ``extra`` says otherwise."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(Path(repo).resolve() / "src"),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MULTIFUSION_THREADS": "1",
        **extra,
    }


def run(repo: Path, *args: str, check: bool = True, **extra_env: str) -> str:
    """``args`` in ``repo``; stdout + stderr; an assertion naming the command when it fails."""
    done = subprocess.run(list(args), cwd=repo, env=env(repo, **extra_env), capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def dvc(repo: Path, *args: str, **extra_env: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args, **extra_env)


def start_queue(repo: Path, jobs: int, **extra_env: str) -> None:
    """`dvc queue start --jobs N`, its output to ``.dvc/tmp/queue-start.log``. It returns once the
    workers are started; they inherit this environment (``extra_env``: the threads per job). Not
    through a pipe: the workers would hold it open, and a reader would wait for them to exit."""
    log = repo / ".dvc" / "tmp" / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "--jobs", str(jobs)], cwd=repo,
                              env=env(repo, **extra_env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    assert done.returncode == 0, f"dvc queue start --jobs {jobs}\n{log.read_text()[-3000:]}"


def wait_for_queue(repo: Path, timeout: float, poll: float = 2.0) -> str:
    """Poll `dvc queue status` until no task is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(repo, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            return status
        assert time.monotonic() < deadline, f"dvc queue still busy after {timeout} s:\n{status}"
        time.sleep(poll)


def stop_queue(repo: Path, timeout: float = 120) -> None:
    """`dvc queue stop`, then wait until no worker is left (an idle one would take the next
    queued task with the threads of its own start)."""
    dvc(repo, "queue", "stop")
    deadline = time.monotonic() + timeout
    while "0 active, 0 idle" not in (status := dvc(repo, "queue", "status")):
        assert time.monotonic() < deadline, f"dvc queue workers still up after {timeout} s:\n{status}"
        time.sleep(1)


def git(repo: Path, *args: str) -> str:
    return run(repo, *GIT, *args)


def make_experiment_repo(tmp_path: Path, repo_root: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """test_pipeline's tiny repository plus comparison/, with SMALLER (and ``overrides``) on its
    params, committed: `dvc exp run` needs a commit."""
    repo = make_tiny_repo(tmp_path, repo_root)
    shutil.copytree(repo_root / "comparison", repo / "comparison")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in {**SMALLER, **(overrides or {})}.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the comparison, smaller")
    return repo


def exp_metrics(shown: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json`` -> {experiment name (or "workspace"/the baseline rev): {metrics file: metrics}}."""
    found: dict[str, dict[str, Any]] = {}
    for commit in shown:
        for exp in [commit, *[e for run_ in commit.get("experiments") or [] for e in run_.get("revs", [])]]:
            data = exp.get("data") or {}
            name = exp.get("name") or data.get("name") or data.get("rev") or exp.get("rev")
            metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
            if name and metrics:
                found[str(name)] = metrics
    return found


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
