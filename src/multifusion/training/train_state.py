"""The training checkpoint a killed run resumes from (``checkpoints/train/last.pt``).

It holds everything ``fit`` needs to continue: weights, optimizer, scheduler, RNG states,
epoch, best score, best weights, the metric history, and a fingerprint of the run so a
stale checkpoint left by other params, model or data is ignored. Written atomically,
read with ``weights_only=True``.

The trained model a user loads (``models/<name>/``) lives in ``multifusion.model.card``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multifusion.core.errors import UserError, one_line
from multifusion.core.config import Config

TRAIN_STATE = "last.pt"


class CheckpointBusyError(UserError, RuntimeError):
    """Another process holds the checkpoint folder."""

# What a training checkpoint may hold beyond tensors and plain Python: numpy's RNG state
# (a uint32 array) and numpy scalars in the metric history. Nothing else is unpickled.
CHECKPOINT_GLOBALS = [
    np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
    np.dtypes.UInt32DType, np.dtypes.Int64DType, np.dtypes.Float32DType, np.dtypes.Float64DType,
]


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and values of a state dict (architecture + init + text)."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(cfg: Config, model_name: str, initial_state: dict[str, torch.Tensor], data_key: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: params that shape training, the model's
    initial weights, the data and the number of processes."""
    sections = {k: v for k, v in cfg.to_dict().items() if k in ("seed", "data", "hnf", "graph", "fusion", "train")}
    sections["data"].pop("unlabeled")  # pretrain_image's input: it reaches training as the initial weights, hashed below
    payload = json.dumps(
        {"cfg": sections, "model_name": model_name, "data": data_key, "world_size": world_size}, sort_keys=True
    )
    return hashlib.sha256((payload + state_fingerprint(initial_state)).encode()).hexdigest()


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(checkpoint_dir: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``checkpoint_dir/last.pt`` (a kill mid-write leaves the old one).

    The temp file has a unique name beside it (``.last.pt.<random>.tmp``), so a stale one
    left by a killed run, or another writer, never collides with this one; it is removed
    when the write fails."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=checkpoint_dir, prefix=f".{TRAIN_STATE}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.chmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 -> what a plain open() would give
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, checkpoint_dir / TRAIN_STATE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(checkpoint_dir: str | Path) -> None:
    """Delete temp files a killed writer left in ``checkpoint_dir`` (call while holding its lock)."""
    for stale in Path(checkpoint_dir).glob(f".{TRAIN_STATE}.*.tmp"):
        stale.unlink(missing_ok=True)
    (Path(checkpoint_dir) / (TRAIN_STATE + ".tmp")).unlink(missing_ok=True)  # the fixed name of older versions


@contextmanager
def checkpoint_lock(checkpoint_dir: str | Path) -> Iterator[None]:
    """Hold ``checkpoint_dir`` for one training: a second trainer on the same folder (an
    orphan of a killed ``dvc repro``, a second run) is refused with one line instead of
    racing this one's checkpoints. An advisory ``flock`` on the folder itself (no lock
    file inside a DVC output); released when the process ends, however it ends."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(checkpoint_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointBusyError(
                f"{checkpoint_dir}: another training is writing checkpoints here (a run still going, or one "
                "orphaned by a killed dvc); wait for it to finish or stop it, then rerun"
            ) from None
        remove_stale_temps(checkpoint_dir)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def load_training_state(checkpoint_dir: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint in ``checkpoint_dir`` if it belongs to this run (same fingerprint), else None.

    Loaded with ``weights_only=True``: tensors, plain Python and the numpy types of
    CHECKPOINT_GLOBALS only, so a foreign or tampered file cannot run code. Its fingerprint
    is checked before anything else in it is used."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: start over rather than crash
        print(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {one_line(exc)[:200]}); starting from scratch")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        print(f"{path}: checkpoint from other params, model or data; starting from scratch")
        return None
    return state
