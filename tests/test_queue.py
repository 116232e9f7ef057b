"""Parallel experiments with DVC's queue: `dvc exp run --queue -S ...`, then
`MULTIFUSION_THREADS=<cores // jobs> dvc queue start --jobs N` (docs/experiments.md).

Default suite: the plumbing, on a one-stage repository (a few seconds of work per run): two
queued experiments run by two workers both land in `dvc exp show`, each with its own param
and the torch thread count the environment of `dvc queue start` set. Slow (`make test-all`):
the product's comparison on a tiny configuration, a learning-rate sweep queued and run with 2
jobs; every queued experiment has exactly the metrics it has when run alone (training seconds
aside)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny_experiments import dvc, exp_metrics, git, make_experiment_repo, run, start_queue, stop_queue, wait_for_queue

QUEUE_TIMEOUT = 900  # seconds: a queue that has not finished by then has hung


def test_threads_per_job_and_the_env_override(monkeypatch) -> None:
    import torch

    from multifusion.core.runtime import THREADS_ENV, apply_thread_env, threads_per_job

    assert [threads_per_job(j, 2) for j in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_job(4, 16) == 4
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        threads_per_job(0, 2)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "1")
        assert apply_thread_env() == 1 == torch.get_num_threads()
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv(THREADS_ENV, bad)
            with pytest.raises(ValueError, match=f"MULTIFUSION_THREADS={bad!r}: set it to a whole number"):
                apply_thread_env()
    finally:
        torch.set_num_threads(before)


STAGE = textwrap.dedent(
    """\
    import json, sys, time
    import yaml
    from multifusion.core.runtime import apply_thread_env
    x = yaml.safe_load(open("params.yaml"))["x"]
    started = time.time()
    time.sleep(2)  # long enough that two workers overlap
    json.dump({"x": x, "threads": apply_thread_env(), "started": started, "ended": time.time()}, open("metrics.json", "w"))
    """
)


def test_queued_experiments_run_side_by_side_with_the_threads_set(tmp_path: Path) -> None:
    """Two queued experiments, `dvc queue start --jobs 2` with MULTIFUSION_THREADS=1: both in
    `dvc exp show` with their own param, both at 1 torch thread, and they overlapped in time."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "params.yaml").write_text("x: 1\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
        "    metrics:\n      - metrics.json:\n          cache: false\n"
    )
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "probe")
    for x in (2, 3):
        dvc(repo, "exp", "run", "--queue", "-S", f"x={x}", "-n", f"x{x}")
    src = str(Path(__file__).resolve().parents[1] / "src")  # the stage imports this checkout's multifusion
    start_queue(repo, 2, MULTIFUSION_THREADS="1", PYTHONPATH=src)
    try:
        status = wait_for_queue(repo, timeout=300)
    finally:
        stop_queue(repo)
    assert status.count("Success") == 2, status
    shown = exp_metrics(json.loads(dvc(repo, "exp", "show", "--json")))
    got = {name: shown[name]["metrics.json"] for name in ("x2", "x3")}
    assert {name: (m["x"], m["threads"]) for name, m in got.items()} == {"x2": (2, 1), "x3": (3, 1)}
    first, second = sorted(got.values(), key=lambda m: m["started"])
    assert second["started"] < first["ended"], "the two jobs ran one after the other, not side by side"
    assert json.loads(run(repo, sys.executable, "-c", "import yaml, json; print(json.dumps(yaml.safe_load(open('params.yaml'))))")) == {"x": 1}


@pytest.mark.slow
def test_a_queued_sweep_of_the_comparison_matches_the_runs_alone(tmp_path: Path, repo_root: Path) -> None:
    """The tiny comparison (MultiFusion and ResNet-18, one seed, one epoch) under a learning-rate
    sweep: two experiments queued, run with 2 jobs of 1 thread; then one of them alone in the
    workspace. Same metrics, exactly, in `dvc exp show` (the training seconds aside)."""
    repo = make_experiment_repo(tmp_path, repo_root)
    dvc(repo, "repro", "embed_text")  # the inputs every experiment shares, cached once
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "text features")
    for lr in ("0.002", "0.003"):
        dvc(repo, "exp", "run", "--queue", "comparison/dvc.yaml", "-S", f"train.lr={lr}", "-n", f"lr{lr}")
    start_queue(repo, 2, MULTIFUSION_THREADS="1")
    try:
        status = wait_for_queue(repo, QUEUE_TIMEOUT)
    finally:
        stop_queue(repo)
    assert status.count("Success") == 2, status
    alone = dvc(repo, "exp", "run", "comparison/dvc.yaml", "-S", "train.lr=0.002", "-n", "alone", MULTIFUSION_THREADS="1")
    assert "(1 threads)" in alone
    shown = exp_metrics(json.loads(dvc(repo, "exp", "show", "--json")))
    files = [f"metrics/compare/{m}/seed42.json" for m in ("multifusion", "resnet18")]

    def scores(name: str) -> dict[str, dict]:
        return {f: {k: v for k, v in shown[name][f].items() if k != "train_seconds"} for f in files}

    assert scores("lr0.002") == scores("alone")
    assert scores("lr0.003") != scores("alone")  # the sweep's param reached its run
    assert shown["lr0.002"][files[0]]["seed"] == 42


def test_queue_command_names_are_what_the_docs_say() -> None:
    """docs/experiments.md's commands are DVC's: `dvc exp run --queue` and `dvc queue start --jobs`."""
    helps = {args: subprocess.run([sys.executable, "-m", "dvc", *args, "--help"], capture_output=True, text=True).stdout
             for args in (("exp", "run"), ("queue", "start"))}
    assert "--queue" in helps[("exp", "run")] and "--jobs" in helps[("queue", "start")]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    assert "dvc exp run --queue" in docs and "dvc queue start --jobs" in docs and "MULTIFUSION_THREADS" in docs
