"""A stage stops when the DVC process that started it dies.

``kill -9`` of ``dvc repro`` (or ``dvc exp run``) alone leaves its stage running: an
orphaned trainer then races the rerun on the same checkpoint folder. :func:`watch_parent`
ties the process to its parent: when the parent exits, the process gets SIGTERM.

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, set at once, then re-checked against the
  parent's pid (the parent may have died before the call). Processes forked later (the
  decoding pool of ``prepare``, DataLoader workers) get ``PR_SET_PDEATHSIG, SIGKILL`` tied
  to this process, through :func:`os.register_at_fork`.
- Everywhere (the portable fallback, and the case of a shell between DVC and the stage):
  a daemon thread checks every ``interval`` seconds that the parent (and, when the parent
  is a shell, the shell's parent) is still the one seen at start, and sends SIGTERM to
  this process otherwise.

:func:`multifusion.core.errors.run_stage` calls it when DVC runs the stage (DVC sets
``DVC_STAGE``), never for a script a user started by hand (``nohup python stages/...``
must outlive its shell).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>
SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}
_armed: list[int] = []        # this process's pid, once armed
_forker: list[int] = []       # the pid of the process that last forked (set just before fork)


def _prctl_pdeathsig(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _proc_parent(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (Linux), or None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...


def _proc_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def watched_chain(parent: int) -> list[tuple[int, int | None]]:
    """[(pid, the parent it must keep, or None)] to keep checking; the last pid is the process
    that started this one. The parent (DVC) only has to stay this process's parent. When the
    parent is a shell (``$SHELL -c cmd`` that did not exec), the shell must keep its own parent,
    DVC (a dead process's children are re-parented). DVC's own parent is never watched:
    ``nohup dvc repro &`` outlives the terminal that started it, and so must its stages."""
    if _proc_name(parent) in SHELLS:
        dvc = _proc_parent(parent)
        if dvc not in (None, 0, 1):
            return [(parent, dvc), (dvc, None)]
    return [(parent, None)]


def chain_alive(chain: list[tuple[int, int | None]]) -> bool:
    """True while this process's parent is unchanged and every watched shell still has the
    parent it had at start."""
    if os.getppid() != chain[0][0]:
        return False
    for pid, its_parent in chain:
        if its_parent is not None and _proc_parent(pid) != its_parent:
            return False
    return True


def _poll(chain: list[tuple[int, int | None]], interval: float, sig: int) -> None:
    event = threading.Event()
    while not event.wait(interval):
        if not chain_alive(chain):
            print(f"{Path(sys.argv[0]).name}: stopping: the process that started it (pid {chain[-1][0]}) is gone",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), sig)
            return


def _note_forker() -> None:
    _forker[:] = [os.getpid()]


def _tie_forked_child() -> None:
    """In a process forked from an armed one (or from one of its workers): die with the
    process that forked it (SIGKILL: a worker holds no state worth a clean exit)."""
    if _prctl_pdeathsig(signal.SIGKILL) and _forker and os.getppid() != _forker[0]:
        os._exit(1)  # the forking process died between fork and prctl


def dvc_pid() -> int:
    """The pid of the process that started this one, past an intermediate shell (Linux)."""
    return watched_chain(os.getppid())[-1][0]


def watch_parent(interval: float = 1.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to this process when its parent (or the parent of an intermediate shell)
    exits. Idempotent; safe to call from the main thread at start-up."""
    if _armed:
        return
    parent = os.getppid()
    _armed.append(os.getpid())
    if _prctl_pdeathsig(sig) and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_note_forker, after_in_child=_tie_forked_child)
    chain = watched_chain(parent)
    threading.Thread(target=_poll, args=(chain, interval, sig), name="watch-parent", daemon=True).start()
