"""While a `dvc exp run` runs its stages in this workspace, a second one is refused before
it touches params.yaml.

DVC runs one `dvc exp run` per workspace, but it lets go of the repository lock while the
stages run, and a second `dvc exp run -S ...` started meanwhile first stashes the
workspace and writes its ``-S`` values into params.yaml, and only then finds the
workspace busy. The first run's later stages then read the second run's params (DVC 3.67;
measured: a run asked for 30 epochs trained 1).

DVC's own guard for this is its experiment lock (``.dvc/tmp/exps/rwlock``): every `dvc
exp run` (``--queue`` too) takes it for writing on ``workspace`` before it stashes
anything. :func:`hold_workspace`, called by every stage that a workspace `dvc exp run`
starts, enters the running DVC process there as a reader of ``workspace``, so the second
`dvc exp run` stops at once with DVC's message ``'workspace' is busy, it is being blocked
by: (PID <n>): ...``, params.yaml untouched. A small detached process removes the entry
when that DVC process ends (DVC would otherwise drop it with a warning, as a dead reader).
Runs in the queue (`dvc queue start`) work in copies of the repository and hold nothing.

It uses two functions of ``dvc.rwlock`` that are not public API; when they are missing
(another DVC version) it holds nothing, and the trainer's params check
(:func:`multifusion.core.config.check_params_unchanged`) still stops a corrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKSPACE = "workspace"          # the path name DVC's experiment lock uses for the workspace
LOCK_DIR = Path(".dvc", "tmp", "exps")


def workspace_run_root() -> Path | None:
    """The repository root when this process is a stage of a `dvc exp run` working in the
    repository itself (not a queued run in a temporary copy), else None."""
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_EXP_NAME") or not root:
        return None
    root_path, here = Path(root).resolve(), Path.cwd().resolve()
    # queued runs work in copies under .dvc/tmp/exps/ (DVC_ROOT still names the workspace)
    return root_path if here.is_relative_to(root_path) and not here.is_relative_to(root_path / ".dvc") else None


def entry_for(dvc_pid: int) -> dict[str, Any]:
    """The reader entry of DVC's lock for the DVC process ``dvc_pid`` (what DVC prints)."""
    return {"pid": dvc_pid, "cmd": f"dvc exp run (PID {dvc_pid}) is running its stages in this workspace: wait for "
                                   "it to end. Several experiments: queue them (`dvc exp run --queue -S ...`), "
                                   "then `dvc queue start`"}


def _edit(lock_dir: Path, change: str, info: dict[str, Any]) -> bool:
    """Add (``change="hold"``) or remove (``"release"``) ``info`` as a reader of the
    workspace in DVC's experiment lock; True when the lock changed (False: no change, or
    DVC's lock functions are not there)."""
    try:
        from dvc.fs import localfs
        from dvc.rwlock import _acquire_read, _edit_rwlock, _release_read
    except ImportError:
        return False
    lock_dir.mkdir(parents=True, exist_ok=True)
    with _edit_rwlock(str(lock_dir), localfs, False) as lock:
        readers = lock["read"].get(WORKSPACE, [])
        if change == "hold" and info not in readers:
            return bool(_acquire_read(lock, info, [WORKSPACE]))
        if change == "release" and info in readers:
            _release_read(lock, info, [WORKSPACE])
            return True
    return False


def hold_workspace(dvc_pid: int) -> bool:
    """Enter ``dvc_pid`` (the `dvc exp run` that started this stage) in DVC's experiment lock
    as a reader of the workspace, until it ends; True when this call added the entry (the
    first stage of the run), False otherwise."""
    root = workspace_run_root()
    if root is None:
        return False
    try:
        if not _edit(root / LOCK_DIR, "hold", entry_for(dvc_pid)):
            return False  # held already by an earlier stage of this run (or DVC's lock functions missing)
    except Exception:  # noqa: BLE001 -- DVC's internals changed: hold nothing (the params check remains)
        return False
    subprocess.Popen(  # detached: outlives this stage, ends with the DVC process
        [sys.executable, "-m", "multifusion.core.exp_lock", str(root / LOCK_DIR), str(dvc_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    return True


def release_when_gone(lock_dir: Path, dvc_pid: int, interval: float = 0.5) -> None:
    """Wait for ``dvc_pid`` to end, then remove its entry (the detached helper's work)."""
    while running(dvc_pid):
        time.sleep(interval)
    _edit(lock_dir, "release", entry_for(dvc_pid))


def running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    try:
        release_when_gone(Path(sys.argv[1]), int(sys.argv[2]))
    except Exception:  # noqa: BLE001 -- detached, no one to tell: DVC drops a dead reader itself
        sys.exit(1)
