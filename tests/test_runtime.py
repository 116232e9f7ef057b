"""multifusion.core.runtime: the device of a ``*.device`` param (errors name that param), the
single-process runtime, seeding of every global RNG, and the CPU thread count."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from multifusion.core.runtime import cpu_threads, resolve_device, seed_everything, setup_runtime, teardown_runtime


@pytest.mark.parametrize("key", ["train.device", "evaluate.device"])
def test_device_errors_name_the_key_they_were_called_for(key):
    with pytest.raises(ValueError, match=f"^params.yaml: {key} must be auto, cpu or cuda, got 'gpu'$"):
        resolve_device("gpu", key)
    assert resolve_device("cpu", key) == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", key, local_rank=0) == torch.device("cuda", 0)
    else:
        assert resolve_device("auto", key) == torch.device("cpu")
        with pytest.raises(RuntimeError, match=f"^params.yaml: {key} is cuda but no CUDA device is available"):
            resolve_device("cuda", key)


def test_single_process_runtime(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runtime = setup_runtime("cpu", "train.device")
    assert (runtime.rank, runtime.world_size, runtime.device, runtime.owns_group, runtime.is_main) == (0, 1, torch.device("cpu"), False, True)
    teardown_runtime(runtime)   # nothing to tear down: no process group was made
    assert not torch.distributed.is_initialized()


def test_seed_everything_seeds_python_numpy_and_torch():
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(5)
    first = draws()
    seed_everything(5)
    assert draws() == first
    seed_everything(6)
    assert all(a != b for a, b in zip(draws(), first))


def test_cpu_threads_sets_then_restores_the_count():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with cpu_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with cpu_threads(0):                        # 0: torch's setting is left alone
        assert torch.get_num_threads() == before
    with pytest.raises(KeyError), cpu_threads(other):
        raise KeyError("restored on errors too")
    assert torch.get_num_threads() == before
