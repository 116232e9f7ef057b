"""The one way the project writes a file: all of it or none of it.

    with atomic_write("predictions.csv", "w", newline="") as f:   # a file object
        table.to_csv(f, index=False)
    with atomic_path("data/prepared/images.npy") as tmp:          # a path, for libraries that want one
        np.save(tmp, images)
    write_text("reports/results.md", text)                        # whole text or bytes at once

The data go to a temporary file beside the target (same folder, so the same file system:
``.<name>.<random>.tmp<suffix>``, hidden, the target's extension kept so that libraries
choosing a format by extension still choose right), are flushed and fsynced, and only then
``os.replace`` puts the file in place; the folder is fsynced after. On any failure (a full
disk, an exception in the caller's block, Ctrl-C) the temporary file is removed and the
previous file at the target, if any, is left as it was. A full disk (ENOSPC, or a quota:
EDQUOT) becomes :class:`DiskFullError`: one line naming the file and the fix.

A leaf module (the standard library and ``core.errors`` only): every package and the
stages may import it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from multifusion.core.errors import UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_written: list[Path] = []  # every file this process put in place, in order (see written_since)


class DiskFullError(UserError, OSError):
    """A write that found no space left; the previous file at the target is intact."""

    def __str__(self) -> str:  # one line, without OSError's "[Errno 28]" prefix
        return self.strerror or OSError.__str__(self)


def _mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path``'s folder."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists():
        folder = folder.parent
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def full_disk_message(path: str | Path) -> str:
    path = Path(path)
    kept = "the previous file there is kept unchanged" if path.exists() else "nothing was written there"
    return (f"{path}: no space left on the device while writing it; {kept}; "
            f"free space on {_mount_point(path)} (or write to another disk) and rerun")


def _is_full_disk(err: BaseException | None) -> bool:
    while err is not None:  # the error itself, or what it was raised from / during
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            return True
        err = err.__cause__ or err.__context__
    return False


def _new_file_mode(target: Path) -> int:
    """The mode the target keeps (when it exists) or a new file gets (0o666 less the umask)."""
    with suppress(OSError):
        return os.stat(target).st_mode & 0o7777
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    with suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parent folders created); when the block ends
    without error, fsync that file and move it onto ``path``. On error it is removed."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        tmp = Path(name)
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the library has closed it; sync what it wrote
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
        _written.append(path)
    except BaseException as err:
        if tmp is not None:
            with suppress(OSError):
                tmp.unlink()
        if _is_full_disk(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(errno.ENOSPC, full_disk_message(path)) from err
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_args: Any) -> Iterator[IO]:
    """Yield the temporary file beside ``path`` opened with ``mode`` ("w", "wb"; ``open_args``
    as for :func:`open`, e.g. ``encoding``, ``newline``); flushed, fsynced and moved onto
    ``path`` when the block ends without error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write: mode {mode!r}; only a new file is written ('w', 'wb')")
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """For a folder a library writes whole (``save_pretrained``): yield an empty staging
    folder beside ``path``; when the block ends without error its files are fsynced and it
    takes the place of ``path`` (any previous folder there is removed only then). On error
    the staging folder is removed and ``path`` is left as it was."""
    path = Path(path)
    staging: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        yield staging
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(staging, 0o777 & ~_umask())
        old = None
        if os.path.lexists(path):
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(staging, path)
        staging = None
        _fsync_folder(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _written.append(path)
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if _is_full_disk(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(errno.ENOSPC, full_disk_message(path)) from err
        raise


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """``path.write_text(text)``, atomically; returns the path."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def written_since(since: int) -> list[Path]:
    """The files put in place since ``since = mark()``: what an interrupted command kept."""
    return list(_written[since:])



def mark() -> int:
    """A bookmark in the list of files written, for :func:`written_since` / :func:`interrupted_line`."""
    return len(_written)


def interrupted_line(since: int) -> str:
    """What a command interrupted by Ctrl-C says: "interrupted; nothing written", or which
    files it had put in place (each complete: no file is ever left half-written)."""
    kept = written_since(since)
    if not kept:
        return "interrupted; nothing written"
    return f"interrupted; kept, each complete: {', '.join(str(p) for p in kept)}; nothing else written"
