"""Run the stages of a DVC matrix (the comparison's model x seed runs) side by side in one
workspace, and record each in dvc.lock as `dvc repro` would.

    python -m multifusion.core.parallel_repro --jobs 2 comparison/dvc.yaml:compare
    dvc repro comparison/dvc.yaml        # then the report, from the recorded runs

Why not `dvc repro` or the queue: `dvc repro` runs one stage at a time, and it holds the
workspace's lock while it runs, so a second one waits. DVC's queue runs side by side, but
each experiment in its own copy of the repository, and its results come back as separate
experiments: the compare stages' checkpoints and dvclive folders are not cached, so the
runs of several experiments cannot be merged into one workspace's 3-seed report
(docs/experiments.md). This runs the same stage commands in this workspace:

1. ``dvc repro`` of every stage the group depends on (``validate`` among them: a refused
   param or layout stops here, before any output is removed);
2. ``dvc status`` of the group: the stages whose deps, params or outputs changed;
3. each of those runs its own ``cmd`` from dvc.yaml in its ``wdir``, once its outputs that
   are not ``persist`` are removed (what `dvc repro` does before a stage runs; the
   checkpoints stay, so a killed run resumes), ``jobs`` at a time, each with
   ``MULTIFUSION_THREADS`` and ``OMP_NUM_THREADS`` = cores // jobs, its output in
   ``.dvc/tmp/parallel_repro/<stage>.log``;
4. each that exits 0 is recorded with ``dvc commit -f <stage>``: its deps, params and
   outputs hashed into dvc.lock and its cached outputs stored, one commit at a time.

A stage that fails is named with its log and left unrecorded; the others go on. Ctrl-C, or a
``kill`` (SIGTERM) of a runner started in the background, stops the running commands with the
same signal (their checkpoints stay for the next run); each command is tied to this
process as DVC ties a stage to itself (``DVC_STAGE``, :mod:`multifusion.core.lifeline`), so
a kill of this process stops them too. Only stages whose command
does not itself call DVC belong in such a group.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from multifusion.core.errors import one_line
from multifusion.core.runtime import THREADS_ENV, threads_per_job

LOG_DIR = Path(".dvc", "tmp", "parallel_repro")


@dataclass
class StageRun:
    """One stage of the group to run: its DVC address, command, working folder and outputs."""

    address: str                  # e.g. comparison/dvc.yaml:compare@resnet18-43
    cmd: str
    wdir: Path
    removable_outs: list[Path]    # outputs `dvc repro` removes before it runs the stage (not persist)


def dvc_command(*args: str) -> list[str]:
    """The DVC of this interpreter's environment."""
    return [sys.executable, "-m", "dvc", *args]


def group_and_upstream(targets: list[str]) -> tuple[list[StageRun], list[str]]:
    """``targets`` (dvc.yaml groups or stages) -> (their stages in that order, the addresses of the
    stages they depend on)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(".") as repo:
        stages = []
        for target in targets:
            found = repo.stage.collect(target)
            if not found:
                raise ValueError(f"{target}: no such stage or group in the workspace's dvc.yaml files")
            stages += [stage for stage in found if stage not in stages]
        graph = repo.index.graph  # edge (stage, stage of one of its deps)
        upstream = set().union(*(nx.descendants(graph, stage) for stage in stages)) - set(stages)
        runs = [
            StageRun(stage.addressing, stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd), Path(stage.wdir),
                     [Path(out.fs_path) for out in stage.outs if not out.persist])
            for stage in stages
        ]
        return runs, sorted(stage.addressing for stage in upstream)


def changed_stages(addresses: list[str]) -> set[str]:
    """The addresses among ``addresses`` that `dvc status` reports changed (to run)."""
    done = subprocess.run(dvc_command("status", "--json", *addresses), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc status failed: {done.stderr.strip() or done.stdout.strip()}")
    return set(json.loads(done.stdout or "{}"))


def remove_outputs(run: StageRun) -> None:
    """What `dvc repro` removes before it runs a stage: its outputs that are not ``persist``
    (cached ones stay in the DVC cache)."""
    for path in run.removable_outs:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def start(run: StageRun, threads: int) -> tuple[subprocess.Popen, Path]:
    """Start ``run``'s command in its wdir, output to its log; -> (process, log path)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / (run.address.replace("/", "_").replace(":", "_") + ".log")
    env = {**os.environ, THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "DVC_STAGE": run.address}  # as under dvc repro: the stage's lifeline stops it if this process dies
    with log.open("w") as out:
        process = subprocess.Popen(run.cmd, shell=True, cwd=run.wdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log


def commit(address: str, lock_wait: float = 300.0) -> None:
    """Record a finished stage in dvc.lock (and its cached outputs in the cache). While another
    DVC command holds the workspace (a `dvc status` in another shell), retry for ``lock_wait`` s."""
    deadline = time.monotonic() + lock_wait
    while True:
        done = subprocess.run(dvc_command("commit", "-f", address), capture_output=True, text=True)
        if done.returncode == 0:
            return
        message = done.stderr.strip() or done.stdout.strip()
        if "Unable to acquire lock" not in message or time.monotonic() > deadline:
            raise RuntimeError(f"dvc commit {address} failed: {one_line(message)}")
        time.sleep(5)


def parallel_repro(targets: list[str], jobs: int, poll: float = 2.0) -> list[str]:
    """Run the changed stages of ``targets`` ``jobs`` at a time, in the order given, and record
    each; -> the addresses that failed."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    runs, upstream = group_and_upstream(targets)
    if upstream:
        print(f"parallel_repro: dvc repro {' '.join(upstream)}", flush=True)
        subprocess.run(dvc_command("repro", *upstream), check=True)
    changed = changed_stages([run.address for run in runs])
    todo = [run for run in runs if run.address in changed]
    threads = threads_per_job(jobs)
    print(f"parallel_repro: {len(todo)} of {len(runs)} stages of {' '.join(targets)} to run, {jobs} at a time, {threads} thread(s) each",
          flush=True)
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    failed: list[str] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                remove_outputs(run)
                process, log = start(run, threads)
                running[run.address] = (process, log, time.perf_counter())
                print(f"  started {run.address} (log {log})", flush=True)
            time.sleep(poll)
            for address, (process, log, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[address]
                seconds = time.perf_counter() - started
                if process.returncode != 0:
                    failed.append(address)
                    print(f"  FAILED {address} (exit {process.returncode}); see {log}", flush=True)
                    continue
                try:
                    commit(address)
                except RuntimeError as exc:  # ran, but DVC could not record it: the next run redoes it
                    failed.append(address)
                    print(f"  NOT RECORDED {address}: {exc}", flush=True)
                else:
                    print(f"  done {address} in {seconds:.0f} s, recorded in dvc.lock", flush=True)
    except KeyboardInterrupt as stop:
        for process, _, _ in running.values():
            os.killpg(process.pid, getattr(stop, "signum", signal.SIGINT))  # the stage's own Ctrl-C or kill: checkpoints kept
        for process, _, _ in running.values():
            process.wait()
        raise
    return failed


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: a runner started in the background by a script has
    SIGINT ignored (and so do the stages it starts), so ``kill`` is how it is stopped."""

    signum = signal.SIGTERM


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", help="dvc.yaml groups or stages, e.g. comparison/dvc.yaml:compare; "
                        "run in the order given (the longest first finishes soonest)")
    parser.add_argument("--jobs", type=int, default=2, help="stages at a time (each gets cores // jobs threads)")
    args = parser.parse_args(argv)
    from dvc.exceptions import DvcException

    signal.signal(signal.SIGTERM, _terminated)
    try:
        failed = parallel_repro(args.targets, args.jobs)
    except KeyboardInterrupt:
        print("parallel_repro: interrupted; finished stages are recorded, the others resume from their checkpoints",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, subprocess.CalledProcessError, DvcException) as exc:
        print(f"parallel_repro: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if failed:
        print(f"parallel_repro: {len(failed)} stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
