"""multifusion.core.parallel_repro: a DVC matrix group's stages run side by side in one
workspace and recorded in dvc.lock, so `dvc repro` afterwards finds them up to date.

Default suite: a tiny pipeline (an upstream stage, a matrix of three stages that sleep and
write, a report that reads them). Slow (`make test-all`): the product's comparison on a tiny
configuration, two stages with 2 jobs, then `dvc repro comparison/dvc.yaml` runs the report
alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny_experiments import dvc, git, make_experiment_repo, run

WORK = textwrap.dedent(
    """\
    import json, os, pathlib, sys, time
    name, out, ckpt = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    if name == "bad":
        sys.exit("refused")
    started = time.time()
    pathlib.Path(f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(60 if name == "slow" else 1.5)  # long enough that two stages overlap
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "runs").open("a").write("x")  # persist: survives a re-run
    out.parent.mkdir(parents=True, exist_ok=True)
    base = open("data/base.txt").read()
    out.write_text(json.dumps({"name": name, "base": base, "threads": os.environ["MULTIFUSION_THREADS"],
                               "started": started, "ended": time.time()}))
    """
)

DVC_YAML = textwrap.dedent(
    """\
    stages:
      base:
        cmd: python -c "open('data/base.txt', 'w').write('b')"
        outs: [data/base.txt]
      work:
        matrix:
          name: ${names}
        cmd: python work.py ${item.name} out/${item.name}.json ckpt/${item.name}
        deps: [work.py, data/base.txt]
        outs:
          - out/${item.name}.json
          - ckpt/${item.name}:
              persist: true
              cache: false
      report:
        cmd: python -c "import glob; open('report.txt', 'w').write(str(len(glob.glob('out/*.json'))))"
        deps: [out]
        outs: [report.txt]
    """
)


def make_repo(tmp_path: Path, names: list[str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data").mkdir()
    (repo / "work.py").write_text(WORK)
    (repo / "params.yaml").write_text(f"names: {json.dumps(names)}\n")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny matrix")
    return repo


def parallel(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-m", "multifusion.core.parallel_repro", *args], cwd=repo, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": src, "DVC_NO_ANALYTICS": "1"})
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_group_runs_side_by_side_and_dvc_repro_then_finds_it_up_to_date(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, ["a", "b", "c"])
    done = parallel(repo, "--jobs", "2", "dvc.yaml:work")
    assert "3 of 3 stages of dvc.yaml:work to run, 2 at a time, 1 thread(s) each" in done.stdout
    outs = {n: json.loads((repo / "out" / f"{n}.json").read_text()) for n in "abc"}
    assert all(o["base"] == "b" and o["threads"] == "1" for o in outs.values())  # upstream made first; threads set
    first, second = sorted([outs["a"], outs["b"]], key=lambda o: o["started"])
    assert second["started"] < first["ended"], "the first two stages ran one after the other"
    assert "Data and pipelines are up to date" in dvc(repo, "status", "dvc.yaml:work")
    repro = dvc(repo, "repro")
    assert "Running stage 'report'" in repro and "Running stage 'work@" not in repro
    assert (repo / "report.txt").read_text() == "3"

    # A second run has nothing to do; after a dep changes it re-runs all three, keeping the persist outputs
    assert "0 of 3 stages" in parallel(repo, "--jobs", "2", "dvc.yaml:work").stdout
    (repo / "work.py").write_text(WORK + "\n# changed\n")
    assert "3 of 3 stages" in parallel(repo, "--jobs", "3", "dvc.yaml:work").stdout
    assert (repo / "ckpt" / "a" / "runs").read_text() == "xx"
    assert "Data and pipelines are up to date" in dvc(repo, "status", "dvc.yaml:work")


def test_a_failing_stage_is_named_and_left_unrecorded_the_others_recorded(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, ["a", "bad"])
    done = parallel(repo, "--jobs", "2", "dvc.yaml:work", check=False)
    assert done.returncode == 1
    assert "FAILED work@bad (exit 1); see .dvc/tmp/parallel_repro/work@bad.log" in done.stdout
    assert "refused" in (repo / ".dvc/tmp/parallel_repro/work@bad.log").read_text()
    status = dvc(repo, "status", "dvc.yaml:work")
    assert "work@bad" in status and "work@a" not in status
    lock = (repo / "dvc.lock").read_text()
    assert "work@a:" in lock and "work@bad:" not in lock


def test_a_kill_of_a_runner_started_in_the_background_stops_its_stages(tmp_path: Path) -> None:
    """`make compare &` from a script: SIGINT comes ignored, so SIGTERM stops the runner, which
    passes it on to the running stages and records none of them."""
    import os
    import signal
    import time

    repo = make_repo(tmp_path, ["slow"])
    src = str(Path(__file__).resolve().parents[1] / "src")
    runner = subprocess.Popen([sys.executable, "-m", "multifusion.core.parallel_repro", "dvc.yaml:work"], cwd=repo,
                              env={**os.environ, "PYTHONPATH": src, "DVC_NO_ANALYTICS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pid_file = repo / "slow.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    stage = int(pid_file.read_text())
    runner.send_signal(signal.SIGINT)  # ignored, as in a background job of a script
    time.sleep(0.5)
    assert runner.poll() is None
    runner.terminate()
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 130 and "interrupted" in err, err
    def running(pid: int) -> bool:  # a zombie waiting for its reaper has stopped
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while running(stage) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(stage), "the stage outlived the runner's kill"
    assert "work@slow:" not in (repo / "dvc.lock").read_text()


def test_an_unknown_target_is_one_line(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, ["a"])
    done = parallel(repo, "dvc.yaml:nothing", check=False)
    assert done.returncode == 2 and done.stderr.startswith("parallel_repro: error:")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_the_comparison_with_two_jobs_then_dvc_repro_makes_only_the_report(tmp_path: Path, repo_root: Path) -> None:
    """The product's comparison (MultiFusion and ResNet-18, one seed, one epoch): both compare
    runs side by side at 1 thread, recorded; `dvc repro comparison/dvc.yaml` runs the report alone."""
    repo = make_experiment_repo(tmp_path, repo_root)
    done = run(repo, sys.executable, "-m", "multifusion.core.parallel_repro", "--jobs", "2", "comparison/dvc.yaml:compare")
    assert "2 of 2 stages" in done and done.count("recorded in dvc.lock") == 2
    repro = dvc(repo, "repro", "comparison/dvc.yaml")
    assert "Running stage 'comparison/dvc.yaml:report'" in repro
    assert "Running stage 'comparison/dvc.yaml:compare@" not in repro
    summary = json.loads((repo / "reports" / "synthetic" / "summary.json").read_text())
    assert set(summary) == {"multifusion", "resnet18"} and all(m["n_seeds"] == 1 for m in summary.values())
