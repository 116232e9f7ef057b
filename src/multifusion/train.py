"""The training loop, generic over any ``nn.Module`` mapping (B, 1, S, S) -> logits (B, C).

    model = build_model(cfg, num_classes, text)            # or build_baseline(...)
    model = fit(model, cfg, "data/prepared", "models/hnf", "checkpoints/train", "dvclive/train", "hnf", text=text)

What it does: AdamW (weight decay on matrices only), linear warmup then cosine decay per
step, label smoothing, class-balanced loss or sampler, batched micrograph augmentation
on the device, bf16 autocast on CUDA (fp32 on CPU), optional ``torch.compile``. After each
epoch it validates (loss, accuracy, macro-F1), logs to dvclive and writes a checkpoint
(weights, optimizer, scheduler, RNG states, epoch, best score, best weights, history)
from which a killed run resumes to the same final weights. Early stopping on val
macro-F1; the best weights are kept. At the end it fits a temperature on the validation
split and saves the model with :func:`multifusion.checkpoint.save_model`.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) it uses DDP (nccl on CUDA, gloo on
CPU); ``train.batch_size`` is the global batch, split evenly over the processes, and each
process trains on an interleaved shard of the same global order, so a step sees the same
images as in a single process. Only rank 0 validates and writes.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from multifusion.calibration import calibrate_temperature
from multifusion.checkpoint import (
    load_training_state,
    rng_states,
    run_fingerprint,
    save_model,
    save_training_state,
    set_rng_states,
    unwrap,
)
from multifusion.config import BALANCE_MODES, Config, TrainConfig  # the allowed train.balance values live with the params
from multifusion.data.dataset import Prepared, SplitDataset, augment_batch, collate_batch, load_prepared, normalize, to_unit
from multifusion.evaluate import macro_scores, predict_logits
from multifusion.text.features import TextFeatures


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool            # this call initialised the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device``: auto | cpu | cuda -> a torch device (cuda:<local_rank> under DDP)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"params.yaml: train.device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params.yaml: train.device is cuda but no CUDA device is available; set it to auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_runtime(train: TrainConfig) -> Runtime:
    """Single process, or DDP when torchrun set WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = resolve_device(train.device, local_rank)
    if world_size <= 1:
        return Runtime(rank=0, world_size=1, device=device, owns_group=False)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns_group)


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


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per optimizer step: linear warmup to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices/kernels only (not biases, norms, tokens)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr)


def data_key(prepared: Prepared) -> str:
    """A short hash of what the run trains on (labels, splits, image shape, content hashes)."""
    cols = [c for c in ("sha256", "label", "split") if c in prepared.manifest.columns]
    text = prepared.manifest[cols].to_csv(index=False) + str(prepared.images.shape)
    return hashlib.sha256(text.encode()).hexdigest()


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
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
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
    _, _, f1 = macro_scores(labels, preds, logits.shape[1])
    return {"loss": loss, "acc": float((preds == labels).mean()), "macro_f1": f1}, logits


def plot_curves(history: list[dict[str, float]]):
    """Training curves (loss; accuracy and macro-F1) per epoch as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train/loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val/loss"] for h in history], label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_score.plot(epochs, [h["train/acc"] for h in history], label="train acc")
    ax_score.plot(epochs, [h["val/acc"] for h in history], label="val acc")
    ax_score.plot(epochs, [h["val/macro_f1"] for h in history], label="val macro-F1")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylim(0, 1)
    ax_score.legend()
    fig.tight_layout()
    return fig


def open_live(live_dir: str | Path, history: list[dict[str, float]]):
    """A fresh dvclive run in live_dir, with the history of a resumed run replayed into it."""
    from dvclive import Live

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None)
    for row in history:
        for name, value in row.items():
            if name != "epoch":
                live.log_metric(name, value)
        live.next_step()
    return live


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
    """Train ``model`` on the train split of ``prepared_dir``; save the best to ``out_dir``.

    ``text`` (the TextFeatures the model was built with, if any) is recorded in the saved
    config so :func:`multifusion.checkpoint.load_model` can rebuild the model. Returns the
    unwrapped model holding the best weights (on rank 0; other ranks hold the last ones).
    The fitted temperature is in ``out_dir/config.json``.
    """
    train = cfg.train
    if train.balance not in BALANCE_MODES:
        raise ValueError(f"params.yaml: train.balance must be one of {', '.join(BALANCE_MODES)}, got {train.balance!r}")
    runtime = setup_runtime(train)
    random.seed(cfg.seed + runtime.rank)
    np.random.seed(cfg.seed + runtime.rank)
    torch.manual_seed(cfg.seed + runtime.rank)

    prepared = load_prepared(prepared_dir)
    num_classes = len(prepared.classes)
    train_set = SplitDataset(prepared, "train")
    val_indices = prepared.split_indices("val")
    if len(train_set) == 0 or len(val_indices) == 0:
        raise ValueError(f"{prepared_dir}: train and val splits must both be non-empty; check data.split in params.yaml")

    model = model.to(runtime.device)
    train_model: nn.Module = model
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if train.compile:
        train_model = torch.compile(train_model)

    steps_per_epoch = len(rank_batches(np.arange(len(train_set)), train.batch_size, 0, runtime.world_size))
    optimizer = adamw(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(train.warmup_epochs * steps_per_epoch, train.epochs * steps_per_epoch)
    )
    weights = class_weights(train_set.targets, num_classes) if train.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=runtime.device),
        label_smoothing=train.label_smoothing,
    )

    fingerprint = run_fingerprint(cfg, model_name, model.state_dict(), data_key(prepared), runtime.world_size)
    state = load_training_state(checkpoint_dir, fingerprint)
    start_epoch, best_f1, since_best, stopped = 0, -1.0, 0, False
    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    history: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_f1, since_best = state["epoch"] + 1, state["best_f1"], state["since_best"]
        best_state, history, stopped = state["best_state"], state["history"], state["stopped"]
        if runtime.is_main:
            set_rng_states(state["rng"])
            print(f"resuming from {Path(checkpoint_dir) / 'last.pt'} after epoch {start_epoch}")
        else:
            torch.manual_seed(cfg.seed + runtime.rank + 1000 * start_epoch)

    live = open_live(live_dir, history) if runtime.is_main else None
    for epoch in range(start_epoch, train.epochs):
        if stopped:
            break
        started = time.perf_counter()
        batches = rank_batches(
            epoch_order(train_set.targets, num_classes, train.balance, cfg.seed, epoch), train.batch_size, runtime.rank, runtime.world_size
        )
        loader = DataLoader(
            train_set,
            batch_sampler=batches,
            collate_fn=collate_batch,
            num_workers=train.num_workers,
            pin_memory=runtime.device.type == "cuda",
        )
        gen = torch.Generator(device=runtime.device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + runtime.rank)
        train_loss, train_acc = train_one_epoch(train_model, loader, optimizer, scheduler, criterion, train, gen, runtime)
        flag = torch.zeros(1, device=runtime.device)
        if runtime.is_main:
            val, _ = validate(model, prepared, val_indices, train.batch_size, runtime.device)
            if val["macro_f1"] > best_f1:
                best_f1, since_best = val["macro_f1"], 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            stopped = 0 < train.patience <= since_best
            row = {
                "epoch": epoch,
                "train/loss": train_loss,
                "train/acc": train_acc,
                "val/loss": val["loss"],
                "val/acc": val["acc"],
                "val/macro_f1": val["macro_f1"],
                "lr": scheduler.get_last_lr()[0],
            }
            history.append(row)
            for name, value in row.items():
                if name != "epoch":
                    live.log_metric(name, value)
            live.next_step()
            save_training_state(
                checkpoint_dir,
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_states(),
                    "best_f1": best_f1,
                    "since_best": since_best,
                    "best_state": best_state,
                    "history": history,
                    "stopped": stopped,
                },
            )
            seconds = time.perf_counter() - started
            print(
                f"epoch {epoch + 1}/{train.epochs}  train loss {train_loss:.4f} acc {train_acc:.3f}  "
                f"val loss {val['loss']:.4f} acc {val['acc']:.3f} macro-F1 {val['macro_f1']:.3f}  {seconds:.1f}s",
                flush=True,
            )
            flag[0] = float(stopped)
        if runtime.world_size > 1:
            dist.broadcast(flag, src=0)
        stopped = bool(flag[0])

    if runtime.is_main:
        if train.patience > 0:  # early stopping: the best val weights; otherwise the last ones
            model.load_state_dict(best_state)
        # the temperature is fitted under the test-time policy the model is used with
        _, val_logits = validate(model, prepared, val_indices, train.batch_size, runtime.device, cfg.evaluate.tta)
        calibration = calibrate_temperature(
            val_logits, prepared.labels(val_indices), prepared.manifest["group"].to_numpy()[val_indices]
        )
        temperature = calibration.temperature
        save_model(out_dir, model, cfg, prepared.classes, text, temperature, model_name, calibration=calibration.to_dict())
        if history:
            live.log_image("training_curves.png", plot_curves(history))
        live.summary["best/val_macro_f1"] = best_f1
        live.summary["temperature"] = temperature
        live.end()
        print(f"best val macro-F1 {best_f1:.3f}; temperature {temperature:.3f}; saved {out_dir}", flush=True)
    if runtime.world_size > 1:
        dist.barrier()
        if runtime.owns_group:
            dist.destroy_process_group()
    return unwrap(model)
