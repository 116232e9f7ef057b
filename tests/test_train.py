"""The training loop: batching/sharding, augmentation, early stopping, dvclive output,
resume after SIGKILL (same final weights), 2-process gloo DDP (same loss curve)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from multifusion.data.dataset import SplitDataset, augment_batch, load_prepared, to_model_input
from multifusion.core.optim import optimizer_step, warmup_cosine, warmup_linear
from multifusion.training.train import epoch_order, rank_batches
from multifusion.training.train_state import TRAIN_STATE

# A tiny model and a command line around fit(), run in subprocesses (kill, DDP) and
# imported in-process for the reference runs, so both build the very same model.
WORKER = '''
import json, os, sys, time
import torch, torch.nn as nn
from multifusion.core.config import load_config
from multifusion.training.train import fit

class Tiny(nn.Module):
    """(B, 1, S, S) -> (B, C); sleeps per training step when slow (to be killed mid-run)."""
    def __init__(self, num_classes, dropout, slow):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * 8 * 8, num_classes))
        self.slow = slow
    def forward(self, x):
        if self.slow and self.training:
            time.sleep(self.slow)
        return self.head(torch.relu(self.conv(x)))

def run(repo, prepared, out, overrides, dropout=0.0, slow=0.0):
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(repo, "params.yaml"), overrides)
    torch.manual_seed(0)
    model = Tiny(3, dropout, slow)
    model.architecture = {"name": "tiny", "args": {}}  # the card's record (not in the registry: this test's own model)
    return fit(model, cfg, prepared, os.path.join(out, "model"), os.path.join(out, "checkpoints"), os.path.join(out, "live"), "tiny")

if __name__ == "__main__":
    repo, prepared, out, overrides, dropout, slow = sys.argv[1:]
    run(repo, prepared, out, json.loads(overrides), float(dropout), float(slow))
'''

# 16 px images: the conv stem's patch grid fits them (params.yaml is checked against the HNF geometry)
BASE = {"data.image_size": 16, "hnf.stem": "conv", "train.batch_size": 8, "train.epochs": 4, "train.lr": 0.01, "train.warmup_epochs": 1}


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "tiny_worker.py"
    path.write_text(WORKER)
    spec = importlib.util.spec_from_file_location("tiny_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_inprocess(worker, repo_root, prepared, out, overrides, dropout=0.0):
    threads = torch.get_num_threads()
    try:
        return worker.run(str(repo_root), str(prepared), str(out), overrides, dropout)
    finally:
        torch.set_num_threads(threads)


def worker_cmd(worker, repo_root, prepared, out, overrides, dropout=0.0, slow=0.0):
    return [sys.executable, worker.__file__, str(repo_root), str(prepared), str(out), json.dumps(overrides), str(dropout), str(slow)]


def read_tsv(path: Path, column: str) -> list[float]:
    lines = path.read_text().strip().splitlines()
    index = lines[0].split("\t").index(column.split("/")[-1])
    return [float(line.split("\t")[index]) for line in lines[1:]]


def test_ranks_see_the_single_process_batches():
    order = np.random.default_rng(0).permutation(48)
    single = rank_batches(order, 8, 0, 1)
    shards = [rank_batches(order, 8, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 6
    for step, batch in enumerate(single):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(batch)
    with pytest.raises(ValueError, match="divisible"):
        rank_batches(order, 7, 0, 2)


def test_epoch_order_is_seeded_and_sampler_balances():
    labels = np.array([0] * 90 + [1] * 10)
    assert np.array_equal(epoch_order(labels, 2, "none", 1, 3), epoch_order(labels, 2, "none", 1, 3))
    assert not np.array_equal(epoch_order(labels, 2, "none", 1, 3), epoch_order(labels, 2, "none", 1, 4))
    assert sorted(epoch_order(labels, 2, "loss", 1, 0)) == list(range(100))
    drawn = np.concatenate([labels[epoch_order(labels, 2, "sampler", 1, e)] for e in range(20)])
    assert abs(drawn.mean() - 0.5) < 0.05          # the minority class drawn half the time


def test_warmup_then_cosine():
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def previous_train_schedule(warmup_steps, total_steps, step):
    """train.py's LR lambda before the schedules moved to multifusion.core.optim (issue 15)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def previous_pretrain_schedule(warmup_steps, phase_steps, step):
    """text/pretrain.py's LR lambda before the move (its warm-up cut at the phase length)."""
    warmup = min(warmup_steps, phase_steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (phase_steps - step) / max(1, phase_steps - warmup))


@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 30), (1, 1), (3, 30), (32, 960), (7, 5), (40, 40)])
def test_schedules_give_the_previous_lr_factors_bit_for_bit(warmup, total):
    steps = range(total + 3)   # LambdaLR also evaluates the step after the last one
    assert [warmup_cosine(warmup, total)(s) for s in steps] == [previous_train_schedule(warmup, total, s) for s in steps]
    linear = warmup_linear(min(warmup, total), total)
    assert [linear(s) for s in steps] == [previous_pretrain_schedule(warmup, total, s) for s in steps]


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_optimizer_step_is_zero_grad_backward_clip_step_schedule(grad_clip):
    """Against the inline block train.py and text/pretrain.py each had before (issue 15)."""
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 5))

    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ours, reference = setup(), setup()
    for _ in range(4):
        model, optimizer, scheduler = ours
        optimizer_step(F.cross_entropy(model(x), y), optimizer, scheduler, model.parameters(), grad_clip)
        model, optimizer, scheduler = reference
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
    assert all(torch.equal(a, b) for a, b in zip(ours[0].parameters(), reference[0].parameters()))
    assert ours[2].get_last_lr() == reference[2].get_last_lr()
    assert not torch.equal(ours[0].weight, setup()[0].weight)   # it did train


def test_to_model_input_and_dataset(make_prepared):
    prepared = load_prepared(make_prepared())
    ds = SplitDataset(prepared, "val")
    images, labels = ds.__getitems__([3, 0, 5])
    np.testing.assert_array_equal(images.numpy(), prepared.images[ds.indices[[3, 0, 5]]])
    assert labels.tolist() == prepared.labels(ds.indices[[3, 0, 5]]).tolist()
    x = to_model_input(images)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, to_model_input(images.numpy()))
    assert torch.allclose(x, (images.float()[:, None] / 255 - 0.5) / 0.25)


def test_load_prepared_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.npy.*dvc repro prepare"):
        load_prepared(tmp_path)


def test_augmentation_is_seeded_and_geometric_ops_are_exact(make_config):
    aug = make_config().train.augment
    x = torch.rand(16, 1, 12, 12)
    a = augment_batch(x, aug, torch.Generator().manual_seed(1))
    b = augment_batch(x, aug, torch.Generator().manual_seed(1))
    c = augment_batch(x, aug, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    off = dataclasses.replace(aug, flips=False, rot90=False, crop_scale=1.0, brightness=0.0, contrast=0.0, noise=0.0)
    assert torch.equal(augment_batch(x, off, torch.Generator()), x)
    # flips + rotations only: every output is one of the 8 symmetries of its input, and several occur
    geo = dataclasses.replace(off, flips=True, rot90=True)
    y = augment_batch(x, geo, torch.Generator().manual_seed(0))
    seen = set()
    for xi, yi in zip(x, y):
        matches = [(f, k) for f in (False, True) for k in range(4) if torch.equal(torch.rot90(xi.flip(-1) if f else xi, k, (-2, -1)), yi)]
        assert matches
        seen.add(matches[0])
    assert len(seen) >= 4
    # a full-area crop is the identity (up to interpolation round-off)
    crop = dataclasses.replace(off, crop_scale=0.999999)
    assert torch.allclose(augment_batch(x, crop, torch.Generator()), x, atol=1e-3)


def test_info_bars_cover_the_bottom_rows_only_in_two_shades(make_config, monkeypatch):
    """burn_info_bars: with probability 1 every image gets a bar of 4-20% of its rows, pure black
    and white, the rows above untouched; probability 0 is the identity. In augment_batch the bar
    comes before the turns (so it lands on every side), and off it draws nothing, so the default
    augmentation's random stream (and a default training) is unchanged."""
    import multifusion.data.dataset as dataset

    x = torch.rand(64, 1, 50, 50) * 0.8 + 0.1  # (B, 1, S, S), never exactly 0 or 1
    y = dataset.burn_info_bars(x, 1.0, torch.Generator().manual_seed(0))
    changed_rows = (y != x).any(dim=-1)[:, 0]  # (B, S)
    heights = changed_rows.sum(dim=1)
    assert heights.min() >= 2 and heights.max() <= 10  # 4% and 20% of 50 rows
    for image, bar_rows, h in zip(y[:, 0], changed_rows, heights):
        assert bar_rows[-h:].all() and not bar_rows[:-h].any()  # one strip, at the bottom
        assert set(image[-h:].unique().tolist()) <= {0.0, 1.0}  # a bar, with text / scale in the other shade
    shades = y[:, 0, -1, 0]  # the bottom-left pixel: the bar's own shade (text starts on the middle rows)
    assert 0 < shades.sum() < len(shades)  # both black and white bars
    assert torch.equal(dataset.burn_info_bars(x, 0.0, torch.Generator()), x)
    some = dataset.burn_info_bars(x, 0.3, torch.Generator().manual_seed(1))
    assert 5 < (some != x).flatten(1).any(dim=1).sum() < 40

    off = dataclasses.replace(make_config().train.augment, crop_scale=1.0, brightness=0.0, contrast=0.0, noise=0.0)
    turned = augment_batch(x, dataclasses.replace(off, info_bar=1.0, flips=True, rot90=True), torch.Generator().manual_seed(2))
    binary = (turned == 0) | (turned == 1)  # (B, 1, S, S)
    sides = {side for image in binary[:, 0] for side, edge in
             (("bottom", image[-1]), ("top", image[0]), ("left", image[:, 0]), ("right", image[:, -1])) if edge.all()}
    assert sides == {"bottom", "top", "left", "right"}
    assert off.info_bar == 0.0  # the default
    monkeypatch.setattr(dataset, "burn_info_bars", lambda *a: pytest.fail("drew an info bar while off"))
    augment_batch(x, off, torch.Generator())


def test_fit_early_stops_and_writes_model_live_checkpoint(make_prepared, worker, repo_root, tmp_path, capsys):
    prepared = make_prepared()
    out = tmp_path / "run"
    # lr 0: val macro-F1 never improves after epoch 1, so patience 2 stops after 3 epochs
    model = run_inprocess(worker, repo_root, prepared, out, {**BASE, "train.epochs": 10, "train.patience": 2, "train.lr": 0.0})
    assert read_tsv(out / "live/plots/metrics/val/macro_f1.tsv", "step") == [0, 1, 2]
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "lr"):
        assert len(read_tsv(out / f"live/plots/metrics/{name}.tsv", "step")) == 3, name
    assert (out / "live/plots/images/training_curves.png").stat().st_size > 1000
    summary = json.loads((out / "live/metrics.json").read_text())
    assert "best/val_macro_f1" in summary and summary["temperature"] > 0
    state = torch.load(out / "checkpoints" / TRAIN_STATE, weights_only=False)
    assert state["epoch"] == 2 and state["stopped"] and len(state["history"]) == 3
    saved = load_file(out / "model/model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    record = json.loads((out / "model/config.json").read_text())
    assert record["model_name"] == "tiny" and record["architecture"] == {"name": "tiny", "args": {}}
    assert "config" not in record and "train" not in json.dumps(record)  # the card, not the params

    # same params again: the finished checkpoint is resumed, nothing retrains, same weights
    capsys.readouterr()
    run_inprocess(worker, repo_root, prepared, out, {**BASE, "train.epochs": 10, "train.patience": 2, "train.lr": 0.0})
    assert "resuming" in capsys.readouterr().out
    assert all(torch.equal(load_file(out / "model/model.safetensors")[k], v) for k, v in saved.items())
    # other params: the stale checkpoint is ignored and training starts over
    run_inprocess(worker, repo_root, prepared, out, {**BASE, "train.epochs": 2, "train.lr": 0.001})
    assert "other params" in capsys.readouterr().out
    assert torch.load(out / "checkpoints" / TRAIN_STATE, weights_only=False)["epoch"] == 1


def test_training_learns_the_tiny_task(make_prepared, worker, repo_root, tmp_path):
    prepared = make_prepared()
    out = tmp_path / "run"
    model = run_inprocess(worker, repo_root, prepared, out, {**BASE, "train.epochs": 8, "train.lr": 0.02, "train.augment.crop_scale": 1.0})
    train_loss = read_tsv(out / "live/plots/metrics/train/loss.tsv", "train/loss")
    assert train_loss[-1] < train_loss[0]
    assert max(read_tsv(out / "live/plots/metrics/val/acc.tsv", "val/acc")) > 0.6   # chance is 1/3
    # no early stopping (patience 0): the last weights are kept, and no best weights are copied
    state = torch.load(out / "checkpoints" / TRAIN_STATE, weights_only=False)
    assert state["best_state"] is None and state["epoch"] == 7
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_resume_after_sigkill_gives_the_same_weights(make_prepared, worker, repo_root, tmp_path, capsys):
    prepared = make_prepared()
    overrides = {**BASE, "train.epochs": 4}
    reference = tmp_path / "reference"
    run_inprocess(worker, repo_root, prepared, reference, overrides, dropout=0.3)

    out = tmp_path / "killed"
    checkpoint = out / "checkpoints" / TRAIN_STATE
    proc = subprocess.Popen(worker_cmd(worker, repo_root, prepared, out, overrides, 0.3, slow=0.15), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()
    killed_at = torch.load(checkpoint, weights_only=False)["epoch"]
    assert killed_at < 3 and not (out / "model").exists()

    capsys.readouterr()
    run_inprocess(worker, repo_root, prepared, out, overrides, dropout=0.3)   # resume (1 thread, as the killed run)
    assert f"resuming from {checkpoint} after epoch {killed_at + 1}" in capsys.readouterr().out
    expected = load_file(reference / "model/model.safetensors")
    resumed = load_file(out / "model/model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert read_tsv(out / "live/plots/metrics/train/loss.tsv", "train/loss") == read_tsv(
        reference / "live/plots/metrics/train/loss.tsv", "train/loss"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_follows_the_single_process_loss_curve(make_prepared, worker, repo_root, tmp_path):
    prepared = make_prepared()
    no_augment = {"train.augment.flips": False, "train.augment.rot90": False, "train.augment.crop_scale": 1.0,
                  "train.augment.brightness": 0.0, "train.augment.contrast": 0.0, "train.augment.noise": 0.0}
    overrides = {**BASE, **no_augment, "train.epochs": 3}
    single = tmp_path / "single"
    run_inprocess(worker, repo_root, prepared, single, overrides)

    ddp = tmp_path / "ddp"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(worker_cmd(worker, repo_root, prepared, ddp, overrides), env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "epoch 3/3" in outputs[0] and "epoch" not in outputs[1]          # only rank 0 reports
    for name in ("train/loss", "train/acc", "val/loss"):
        expected = read_tsv(single / f"live/plots/metrics/{name}.tsv", name)
        got = read_tsv(ddp / f"live/plots/metrics/{name}.tsv", name)
        assert len(got) == len(expected) == 3
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)
