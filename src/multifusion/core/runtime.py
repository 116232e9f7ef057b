"""Where a stage runs: the torch device of a ``*.device`` param, the process group of a
``torchrun`` launch, the seeding of every RNG, and the CPU thread count.

    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    runtime = setup_runtime(cfg.train.device, "train.device")   # DDP when WORLD_SIZE > 1
    ...
    teardown_runtime(runtime)

Below everything but the config: stages, the trainer, evaluation and the text LM import it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from multifusion.core.config import DEVICES  # the allowed *.device values live with the params


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool            # this process initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, key: str, local_rank: int = 0) -> torch.device:
    """``name``, the value of params.yaml's ``key`` (e.g. ``evaluate.device``): auto | cpu |
    cuda -> a torch device (cuda:<local_rank> under DDP; auto: cuda when one is visible)."""
    if name not in DEVICES:
        raise ValueError(f"params.yaml: {key} must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"params.yaml: {key} is cuda but no CUDA device is available; set it to auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_runtime(device_name: str, key: str) -> Runtime:
    """Single process, or DDP (nccl on CUDA, gloo on CPU) when torchrun set WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = resolve_device(device_name, key, local_rank)
    if world_size <= 1:
        return Runtime(rank=0, world_size=1, device=device, owns_group=False)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns_group)


def teardown_runtime(runtime: Runtime) -> None:
    """Wait for every process; leave the process group if this process set it up."""
    if runtime.world_size > 1:
        dist.barrier()
        if runtime.owns_group:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (in that order)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (0: leave torch's setting), then restore it.

    The LM's matrices are small: extra threads gain little, and on a shared machine
    they spin against each other (measured here: 30 steps in 1.3 s on 1 thread, 26 s on
    2 under load). A fixed count also keeps float reductions, so outputs, reproducible.
    """
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


THREADS_ENV = "MULTIFUSION_THREADS"


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads for each of ``jobs`` runs side by side on ``cores`` (default: the usable
    cores) so they do not oversubscribe them: ``cores // jobs``, at least 1."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, cores // jobs)


def apply_thread_env() -> int:
    """Set torch's intra-op threads from ``$MULTIFUSION_THREADS`` when it is set (e.g. by
    ``MULTIFUSION_THREADS=1 dvc queue start --jobs 2``); returns the count in use. Unset:
    torch's own choice (which follows ``OMP_NUM_THREADS``). A bad value is a one-line error."""
    raw = os.environ.get(THREADS_ENV)
    if raw is not None and raw.strip():
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"${THREADS_ENV}={raw!r}: set it to a whole number of threads >= 1 (cores // parallel jobs), or unset it")
        torch.set_num_threads(n)
    return torch.get_num_threads()
