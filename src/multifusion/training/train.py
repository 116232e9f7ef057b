"""The training loop, generic over any ``nn.Module`` mapping (B, 1, S, S) -> logits (B, C).

    model = build_model(cfg, classes, text)                # or build_baseline(...)
    model = fit(model, cfg, "data/prepared", "models/hnf", "checkpoints/train", "dvclive/train", "hnf", text=text)

What it does: AdamW (weight decay on matrices only), linear warmup then cosine decay per
step, label smoothing, class-balanced loss or sampler, batched micrograph augmentation
on the device, bf16 autocast on CUDA (fp32 on CPU), optional ``torch.compile``. After each
epoch it validates (loss, accuracy, macro-F1), logs to dvclive and writes a checkpoint
(weights, optimizer, scheduler, RNG states, epoch, best score, best weights, history)
from which a killed run resumes to the same final weights. Early stopping on val
macro-F1 (``train.patience`` > 0) keeps the best weights; without it the last ones are
kept. At the end it fits a temperature on the validation split, fits the unknown-material score and the val
risk-coverage curve (:mod:`multifusion.training.screening`) and saves the model with
:func:`multifusion.model.card.save_model`.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) it uses DDP (nccl on CUDA, gloo on
CPU); ``train.batch_size`` is the global batch, split evenly over the processes, and each
process trains on an interleaved shard of the same global order, so a step sees the same
images as in a single process. Only rank 0 validates and writes.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from multifusion.evaluation.calibration import calibrate_temperature
from multifusion.core.config import Config, TrainConfig, check_params_unchanged
from multifusion.data.dataset import Prepared, SplitDataset, augment_batch, collate_batch, load_prepared, normalize, to_unit
from multifusion.evaluation.evaluate import macro_scores, predict_logits
from multifusion.core.optim import adamw, optimizer_step, warmup_cosine
from multifusion.core.runtime import Runtime, seed_everything, setup_runtime, teardown_runtime
from multifusion.model.card import save_model
from multifusion.text.features import TextFeatures
from multifusion.training.train_state import (checkpoint_lock, load_training_state, rng_states, run_fingerprint,
                                               save_training_state, set_rng_states)
from multifusion.training.screening import fit_screening
from multifusion.training.training_log import close_live, epoch_row, log_row, open_live

if TYPE_CHECKING:
    from dvclive import Live

StateDict = dict[str, torch.Tensor]


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so a balanced set gets weight 1 (absent classes: 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)


def epoch_order(labels: np.ndarray, num_classes: int, balance: str, seed: int, epoch: int) -> np.ndarray:
    """The global order of training positions for one epoch (deterministic in seed, epoch).

    ``balance == "sampler"`` draws len(labels) positions with replacement, each class
    equally likely; otherwise a permutation.
    """
    gen = np.random.default_rng([seed, epoch])
    n = len(labels)
    if balance == "sampler":
        p = class_weights(labels, num_classes)[labels]
        return gen.choice(n, size=n, replace=True, p=p / p.sum())
    return gen.permutation(n)


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches: the order padded to a multiple of world_size, interleaved shard,
    cut into batches of batch_size // world_size (the last partial batch dropped when a full
    one exists, so BatchNorm never sees a batch of one)."""
    if batch_size % world_size:
        raise ValueError(f"params.yaml: train.batch_size {batch_size} must be divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    pad = (-len(order)) % world_size
    order = np.concatenate([order, order[:pad]])
    shard = order[rank::world_size]
    batches = [shard[i : i + per_rank].tolist() for i in range(0, len(shard), per_rank)]
    if len(batches) > 1 and len(batches[-1]) < per_rank:
        batches.pop()
    return batches


def data_key(prepared: Prepared) -> str:
    """A short hash of what the run trains on (labels, splits, image shape, content hashes)."""
    cols = [c for c in ("sha256", "label", "split") if c in prepared.manifest.columns]
    text = prepared.manifest[cols].to_csv(index=False) + str(prepared.images.shape)
    return hashlib.sha256(text.encode()).hexdigest()


def cpu_copy(state: StateDict) -> StateDict:
    """A detached CPU copy of a state dict (later steps leave it unchanged)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@dataclass
class TrainingRun:
    """What one call of :func:`fit` trains with, set up once before the first epoch."""

    cfg: Config
    runtime: Runtime
    prepared: Prepared
    train_set: SplitDataset
    val_indices: np.ndarray
    model: nn.Module                 # the plain module: validated, checkpointed and saved
    train_model: nn.Module           # what the steps run: the model, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    fingerprint: str                 # what a checkpoint must match to be resumed
    model_name: str = "model"

    @property
    def num_classes(self) -> int:
        return len(self.prepared.classes)


@dataclass
class Progress:
    """Where the run stands after its last finished epoch; saved in every checkpoint."""

    next_epoch: int = 0
    best_f1: float = -1.0
    since_best: int = 0
    stopped: bool = False            # early stopping ended the run
    best_state: StateDict | None = None  # the best weights so far (early stopping only)
    history: list[dict[str, float]] = field(default_factory=list)

    def note_validation(self, val_f1: float, model: nn.Module, patience: int) -> None:
        """Track the best val macro-F1; copy the weights only where early stopping may need them."""
        if val_f1 > self.best_f1:
            self.best_f1, self.since_best = val_f1, 0
            if patience > 0:
                self.best_state = cpu_copy(model.state_dict())
        else:
            self.since_best += 1
        self.stopped = 0 < patience <= self.since_best


def load_splits(prepared_dir: str | Path) -> tuple[Prepared, SplitDataset, np.ndarray]:
    """The prepared data, its train split as a dataset and its val indices (both non-empty)."""
    prepared = load_prepared(prepared_dir)
    train_set = SplitDataset(prepared, "train")
    val_indices = prepared.split_indices("val")
    if len(train_set) == 0 or len(val_indices) == 0:
        raise ValueError(f"{prepared_dir}: train and val splits must both be non-empty; check data.split in params.yaml")
    return prepared, train_set, val_indices


def for_training(model: nn.Module, runtime: Runtime, compile_model: bool) -> nn.Module:
    """The module the steps run: ``model`` under DDP when distributed, compiled on request."""
    train_model = model
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile_model:
        train_model = torch.compile(train_model)
    return train_model


def loss_function(train: TrainConfig, targets: np.ndarray, num_classes: int, device: torch.device) -> nn.Module:
    """Cross-entropy with label smoothing, class-weighted when ``train.balance`` is loss."""
    weights = class_weights(targets, num_classes) if train.balance == "loss" else None
    return nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
        label_smoothing=train.label_smoothing,
    )


def start_run(model: nn.Module, cfg: Config, prepared_dir: str | Path, model_name: str) -> TrainingRun:
    """Runtime (device, DDP), seeds, data, optimizer, schedule and loss of a fresh run."""
    train = cfg.train
    runtime = setup_runtime(train.device, "train.device")
    seed_everything(cfg.seed + runtime.rank)
    prepared, train_set, val_indices = load_splits(prepared_dir)
    model = model.to(runtime.device)
    train_model = for_training(model, runtime, train.compile)
    steps_per_epoch = len(rank_batches(np.arange(len(train_set)), train.batch_size, 0, runtime.world_size))
    optimizer = adamw(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(train.warmup_epochs * steps_per_epoch, train.epochs * steps_per_epoch)
    )
    criterion = loss_function(train, train_set.targets, len(prepared.classes), runtime.device)
    fingerprint = run_fingerprint(cfg, model_name, model.state_dict(), data_key(prepared), runtime.world_size)
    return TrainingRun(cfg, runtime, prepared, train_set, val_indices, model, train_model, optimizer, scheduler, criterion, fingerprint,
                       model_name)


def resume(run: TrainingRun, checkpoint_dir: str | Path) -> Progress:
    """The progress of a fresh run, or of the checkpoint in ``checkpoint_dir`` when it belongs
    to this run (same fingerprint): weights, optimizer, schedule and RNG states restored."""
    patience = run.cfg.train.patience
    progress = Progress(best_state=cpu_copy(run.model.state_dict()) if patience > 0 else None)
    state = load_training_state(checkpoint_dir, run.fingerprint)
    if state is None:
        return progress
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    progress = Progress(
        next_epoch=state["epoch"] + 1, best_f1=state["best_f1"], since_best=state["since_best"], stopped=state["stopped"],
        best_state=state["best_state"], history=state["history"],
    )
    if run.runtime.is_main:
        set_rng_states(state["rng"])
        print(f"resuming from {Path(checkpoint_dir) / 'last.pt'} after epoch {progress.next_epoch}")
    else:
        torch.manual_seed(run.cfg.seed + run.runtime.rank + 1000 * progress.next_epoch)
    return progress


def training_state(run: TrainingRun, progress: Progress, epoch: int) -> dict[str, Any]:
    """The checkpoint after ``epoch``: everything a killed run needs to resume identically."""
    return {
        "fingerprint": run.fingerprint,
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_states(),
        "best_f1": progress.best_f1,
        "since_best": progress.since_best,
        "best_state": progress.best_state,
        "history": progress.history,
        "stopped": progress.stopped,
    }


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    train: TrainConfig,
    gen: torch.Generator,
    runtime: Runtime,
) -> tuple[float, float]:
    """One pass over this rank's batches; returns (mean loss, accuracy) over all ranks."""
    model.train()
    device = runtime.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)     # loss sum, correct, count
    for images_u8, labels in loader:
        x = to_unit(images_u8.to(device, non_blocking=True))          # (B, 1, S, S) in [0, 1]
        x = normalize(augment_batch(x, train.augment, gen))
        y = labels.to(device, non_blocking=True)                      # (B,)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)                                          # (B, C)
        loss = criterion(logits.float(), y)
        optimizer_step(loss, optimizer, scheduler, model.parameters(), train.grad_clip)
        totals += torch.stack(
            [loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), device=device, dtype=torch.float64)]
        )
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def validate(
    model: nn.Module, prepared: Prepared, indices: np.ndarray, batch_size: int, device: torch.device, tta: bool = False
) -> tuple[dict[str, float], np.ndarray]:
    """Val loss (plain cross-entropy), accuracy and macro-F1; also the logits (N, C)."""
    logits = predict_logits(model, prepared.images[indices], batch_size, device, tta)  # (N, C)
    labels = prepared.labels(indices)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    preds = logits.argmax(axis=1)
    _, _, f1 = macro_scores(labels, preds)
    return {"loss": loss, "acc": float((preds == labels).mean()), "macro_f1": f1}, logits


def train_epoch(run: TrainingRun, epoch: int) -> tuple[float, float]:
    """Train one epoch on this rank's shard of the epoch's order; (mean loss, accuracy)."""
    train, runtime = run.cfg.train, run.runtime
    order = epoch_order(run.train_set.targets, run.num_classes, train.balance, run.cfg.seed, epoch)
    loader = DataLoader(
        run.train_set,
        batch_sampler=rank_batches(order, train.batch_size, runtime.rank, runtime.world_size),
        collate_fn=collate_batch,
        num_workers=train.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )
    gen = torch.Generator(device=runtime.device).manual_seed(run.cfg.seed * 1_000_003 + epoch * 1009 + runtime.rank)
    return train_one_epoch(run.train_model, loader, run.optimizer, run.scheduler, run.criterion, train, gen, runtime)


def end_epoch(
    run: TrainingRun, progress: Progress, epoch: int, train_scores: tuple[float, float], live: Live, checkpoint_dir: str | Path, started: float
) -> None:
    """Rank 0: validate, track the best, log, checkpoint and report the epoch (begun at ``started``)."""
    train = run.cfg.train
    val, _ = validate(run.model, run.prepared, run.val_indices, train.batch_size, run.runtime.device)
    progress.note_validation(val["macro_f1"], run.model, train.patience)
    row = epoch_row(epoch, *train_scores, val, run.scheduler.get_last_lr()[0])
    progress.history.append(row)
    log_row(live, row)
    check_params_unchanged(f"training {run.model_name}")  # before this epoch's checkpoint: see the function
    save_training_state(checkpoint_dir, training_state(run, progress, epoch))
    print(
        f"epoch {epoch + 1}/{train.epochs}  train loss {train_scores[0]:.4f} acc {train_scores[1]:.3f}  "
        f"val loss {val['loss']:.4f} acc {val['acc']:.3f} macro-F1 {val['macro_f1']:.3f}  {time.perf_counter() - started:.1f}s",
        flush=True,
    )


def share_stopped(runtime: Runtime, stopped: bool) -> bool:
    """Rank 0's early-stopping decision, on every rank."""
    flag = torch.tensor([float(stopped)], device=runtime.device)
    if runtime.world_size > 1:
        dist.broadcast(flag, src=0)
    return bool(flag[0])


def finish(run: TrainingRun, progress: Progress, out_dir: str | Path, model_name: str, text: TextFeatures | None, live: Live) -> None:
    """Rank 0: keep the best weights under early stopping, fit the temperature on val, save, close the log."""
    cfg = run.cfg
    check_params_unchanged(f"training {model_name}")
    if cfg.train.patience > 0:  # early stopping: the best val weights; otherwise the last ones
        run.model.load_state_dict(progress.best_state)
    # the temperature is fitted under the test-time policy the model is used with
    _, val_logits = validate(run.model, run.prepared, run.val_indices, cfg.train.batch_size, run.runtime.device, cfg.evaluate.tta)
    groups = run.prepared.manifest["group"].to_numpy()[run.val_indices]
    calibration = calibrate_temperature(val_logits, run.prepared.labels(run.val_indices), groups)
    temperature = calibration.temperature
    # the unknown-material score and the val risk-coverage curve, on the final weights and temperature
    unknown = fit_screening(run.model, run.prepared, cfg, temperature, run.runtime.device, out_dir)
    save_model(out_dir, run.model, cfg, run.prepared.classes, text, temperature, model_name, calibration=calibration.to_dict(),
               unknown=unknown)
    close_live(live, progress.history, progress.best_f1, temperature)
    print(f"best val macro-F1 {progress.best_f1:.3f}; temperature {temperature:.3f}; saved {out_dir}", flush=True)


def fit(
    model: nn.Module,
    cfg: Config,
    prepared_dir: str | Path,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    live_dir: str | Path,
    model_name: str,
    text: TextFeatures | None = None,
) -> nn.Module:
    """Train ``model`` on the train split of ``prepared_dir``; save it to ``out_dir``.

    ``text`` (the TextFeatures the model was built with, if any) is recorded in the saved
    config so :func:`multifusion.model.card.load_model` can rebuild the model. Returns the
    model holding the saved weights (on rank 0; other ranks hold the last ones). The
    fitted temperature is in ``out_dir/config.json``.

    Rank 0 holds ``checkpoint_dir`` for the whole run (a second trainer on it is refused),
    and stops with one line if params.yaml is rewritten under it (a second ``dvc exp run``).
    """
    if is_main_process():
        with checkpoint_lock(checkpoint_dir):
            return _fit(model, cfg, prepared_dir, out_dir, checkpoint_dir, live_dir, model_name, text)
    return _fit(model, cfg, prepared_dir, out_dir, checkpoint_dir, live_dir, model_name, text)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process (read from the environment torchrun sets)."""
    return int(os.environ.get("RANK", "0")) == 0


def _fit(
    model: nn.Module,
    cfg: Config,
    prepared_dir: str | Path,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    live_dir: str | Path,
    model_name: str,
    text: TextFeatures | None,
) -> nn.Module:
    """:func:`fit`, with the checkpoint folder held."""
    run = start_run(model, cfg, prepared_dir, model_name)
    progress = resume(run, checkpoint_dir)
    main = run.runtime.is_main
    live = open_live(live_dir, progress.history) if main else None
    for epoch in range(progress.next_epoch, cfg.train.epochs):
        if progress.stopped:
            break
        started = time.perf_counter()
        train_scores = train_epoch(run, epoch)
        if main:
            end_epoch(run, progress, epoch, train_scores, live, checkpoint_dir, started)
        progress.stopped = share_stopped(run.runtime, progress.stopped)
    if main:
        finish(run, progress, out_dir, model_name, text, live)
    teardown_runtime(run.runtime)
    return run.model
