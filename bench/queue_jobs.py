"""Wall time of a small comparison through DVC's queue, with 1 and with 2 jobs.

    python bench/queue_jobs.py --out bench/results/queue_$(date +%F).txt [--models multifusion resnet18 mf_no_text] [--epochs 2]
    python bench/queue_jobs.py --repo WS --seeds 42 43 --epochs 3 --out ...   # a real workspace, e.g. one on NCM

Without ``--repo``, a REDUCED configuration: tests/tiny_experiments.py's tiny repository
(150 synthetic micrographs at 32 px, a small graph trunk, a from-scratch LM), ``--epochs``
epochs. With ``--repo``, a clone of this project where ``prepare`` and the text stages have
run on the data set to time (its committed params plus its uncommitted ``params.yaml``: the
default model; ``--epochs`` and ``compare.robustness: false`` set per experiment). One
experiment per model and seed (``-S compare.models=[<model>] -S compare.seeds=[<seed>]``,
target ``comparison/dvc.yaml:compare``) is queued; `dvc queue start --jobs N` runs them with
MULTIFUSION_THREADS = cores // N (runtime.threads_per_job). The same queue is timed with
N = 1 and N = 2, from `dvc queue start` until no task is queued or running. Prints and writes a
table: jobs, threads per job, wall seconds, the ratio, and the load average of the machine
before and after each (other work on a shared machine slows both runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tiny repository of the tests
sys.path.insert(0, str(REPO_ROOT / "src"))

from tiny_experiments import dvc, git, make_experiment_repo, start_queue, stop_queue, wait_for_queue  # noqa: E402

from multifusion.core.runtime import threads_per_job  # noqa: E402


def timed_queue(repo: Path, models: list[str], jobs: int, seeds: list[int], epochs: int) -> tuple[float, str]:
    """Queue one experiment per model and seed, run them with ``jobs`` workers; (wall seconds, status)."""
    for model in models:
        for seed in seeds:
            dvc(repo, "exp", "run", "--queue", "comparison/dvc.yaml:compare", "-S", f"compare.models=[{model}]",
                "-S", f"compare.seeds=[{seed}]", "-S", f"train.epochs={epochs}", "-S", "compare.robustness=false",
                "-n", f"j{jobs}-{model}-{seed}")
    threads = threads_per_job(jobs)
    started = time.perf_counter()
    start_queue(repo, jobs, MULTIFUSION_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    try:
        status = wait_for_queue(repo, timeout=3600)
        wall = time.perf_counter() - started
    finally:
        stop_queue(repo)  # the next round's workers start with their own threads
    if status.count("Success") != len(models) * len(seeds):
        raise RuntimeError(f"not every queued experiment succeeded:\n{status}")
    return wall, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["multifusion", "resnet18", "mf_no_text"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--repo", type=Path, default=None, help="time this workspace (prepare and text stages done) instead of the tiny one")
    args = parser.parse_args()

    def run_rounds(repo: Path) -> list[tuple]:
        rows = []
        for jobs in (1, 2):
            load_before = os.getloadavg()[0]
            wall, _ = timed_queue(repo, args.models, jobs, args.seeds, args.epochs)
            rows.append((jobs, threads_per_job(jobs), wall, load_before, os.getloadavg()[0]))
            dvc(repo, "queue", "remove", "--success")  # the next round's status counts its own tasks only
        return rows

    if args.repo is not None:
        rows = run_rounds(args.repo.resolve())
        config = (f"# {args.repo}'s data set and default model at {args.epochs} epochs (REDUCED from the default budget), "
                  f"{len(args.models)} models ({', '.join(args.models)}) x {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); "
                  "one queued experiment per model and seed.")
    else:
        with tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp:
            repo = make_experiment_repo(Path(tmp), REPO_ROOT, {"train": {"epochs": args.epochs}})
            dvc(repo, "repro", "embed_text")  # the shared inputs, once, outside the timed runs
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "text features")
            rows = run_rounds(repo)
        config = (f"# REDUCED configuration, not the NCM comparison: {len(args.models)} models ({', '.join(args.models)}) x "
                  f"{len(args.seeds)} seed(s), {args.epochs} epochs, tests/tiny_experiments.py's tiny synthetic set (150 images, "
                  "32 px); one queued experiment per model and seed.")

    base = rows[0][2]
    lines = [
        f"# bench/queue_jobs.py, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {len(os.sched_getaffinity(0))} cores usable",
        config,
        "# Wall: from `dvc queue start` until no task is queued or running. The machine is shared: load average",
        "# (1 min) before and after each run says how busy it was.",
        "jobs  threads/job  wall_s  ratio_vs_1_job  load_before  load_after",
        *(f"{j:>4}  {t:>11}  {w:>6.1f}  {base / w:>14.2f}  {lb:>11.2f}  {la:>10.2f}" for j, t, w, lb, la in rows),
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
