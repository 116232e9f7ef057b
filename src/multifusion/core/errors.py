"""A user's mistake ends a stage with one clean line on stderr and exit status 1.

Every stage script runs its ``main`` through :func:`run_stage`:

    if __name__ == "__main__":
        run_stage("prepare", main)

What counts as a user error (the message already names the file or key and the fix):
- any :class:`UserError` (ConfigError, CacheError, ModelDirError, LayoutError, ...);
- a ValueError or RuntimeError raised by a ``raise`` statement of this project's own code
  (``multifusion`` or ``stages``): by convention those messages say what to do;
- a path that is missing or unusable: FileNotFoundError, IsADirectoryError,
  NotADirectoryError, PermissionError.
Anything else (a bug, a torch shape error) keeps its traceback. ``MULTIFUSION_DEBUG=1``
keeps the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from multifusion.core.exp_lock import hold_workspace
from multifusion.core.lifeline import dvc_pid, watch_parent

T = TypeVar("T")
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
OWN_CODE = (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[3] / "stages")


class UserError(Exception):
    """An error in the user's input, params or files; the message is the whole report."""


def raised_by_own_code(err: BaseException) -> bool:
    """True when the innermost frame of ``err``'s traceback is in this project's source."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    source = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(source.is_relative_to(root) for root in OWN_CODE)


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, (UserError, *PATH_ERRORS)):
        return True
    return isinstance(err, (ValueError, RuntimeError)) and raised_by_own_code(err)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (the exception's name when it has no message)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def run_stage(name: str, main: Callable[[], T]) -> T:
    """``main()``; a user error becomes ``<name>: error: <message>`` on stderr and exit 1.

    Under DVC (``DVC_STAGE`` set) the stage is first tied to the DVC process: it stops when
    that process dies (:func:`multifusion.core.lifeline.watch_parent`), so a rerun never
    races an orphan; under a workspace ``dvc exp run`` a second one is refused before it
    rewrites params.yaml (:func:`multifusion.core.exp_lock.hold_workspace`).
    Ctrl-C ends it with one line, ``<name>: interrupted; nothing written`` or the files it
    had put in place (each whole: :mod:`multifusion.core.atomic`), exit 130."""
    from multifusion.core.atomic import interrupted_line, mark

    if os.environ.get("DVC_STAGE"):
        watch_parent()
        hold_workspace(dvc_pid())  # under a workspace `dvc exp run`: a second one is refused before it writes params
    since = mark()
    try:
        return main()
    except KeyboardInterrupt:
        if os.environ.get("MULTIFUSION_DEBUG"):
            raise
        print(f"{name}: {interrupted_line(since)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 -- sorted below: user errors end cleanly, the rest re-raise
        if not is_user_error(err) or os.environ.get("MULTIFUSION_DEBUG"):
            raise
        print(f"{name}: error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
