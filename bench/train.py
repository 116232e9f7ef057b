"""Training throughput and time-to-accuracy: HNF (the params.yaml model) beside the
baselines at the same image size, batch and recipe, in the same run.

    python bench/train.py                      # CPU here: fp32, batch train.batch_size
    python bench/train.py --device cuda        # bf16 autocast, FLOPs and MFU
    python bench/train.py --models hnf,vit_small,resnet18,resnet50,swin_tiny,vig --batch 128
    python bench/train.py --models hnf,resnet18 --to-accuracy 0.8 \
        --prepared data/prepared --text data/text_features      # seconds until test top-1 >= 0.8

Time-to-accuracy trains each model with the default recipe (multifusion.training.train: AdamW,
warmup + cosine over train.epochs, augmentation, class-weighted loss) on the prepared
train split, scores the test split after every epoch under the test-time policy
(evaluate.tta) and reports the training seconds (scoring excluded) until top-1 first
reaches the target.

One training step = forward, cross-entropy, backward, AdamW step on a random batch
(B, 1, S, S) (augmentation and data loading excluded: this measures the models). HNF gets
random text features of the shape embed_text produces (classes x templates x samples
descriptions, text.max_length tokens, text.hidden dims). On CUDA, model FLOPs per image
are counted once with torch.utils.flop_counter.FlopCounterMode (forward + backward; on CPU
too), and on CUDA model FLOPs utilisation (MFU) is achieved FLOP/s over a measured bf16
matmul peak.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from multifusion.core.config import Config, load_config
from multifusion.model import build_model
from multifusion.model.baselines import build_baseline
from multifusion.text.features import TextFeatures, random_text_features

NUM_CLASSES = 10
CLASSES = [f"class{k}" for k in range(NUM_CLASSES)]
TEXT_DIM = 384  # the token-state width of the default text LM (all-MiniLM-L6-v2)


def random_text(cfg: Config, classes: list[str]) -> TextFeatures:
    """Text features of the shape the pipeline's embed_text stage writes (values random):
    one description per class, template and sample, text.max_length tokens, TEXT_DIM wide."""
    templates = [f"{t}/{s}" for t in cfg.llm.templates for s in range(cfg.llm.samples)]
    return random_text_features(classes, templates, cfg.text.max_length, TEXT_DIM)


def make_model(name: str, cfg: Config) -> nn.Module:
    if name == "hnf":
        return build_model(cfg, CLASSES, random_text(cfg, CLASSES) if cfg.fusion.text else None)
    return build_baseline(name, NUM_CLASSES, cfg.data.image_size)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)  # (B, C)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, batch: int, size: int, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(training images/s, model FLOPs per image, forward + backward)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)  # (B, 1, S, S)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    bf16 = device.type == "cuda"
    counter = FlopCounterMode(display=False)
    with counter:  # one counted step (also a warm-up step)
        train_step(model, opt, x, y, bf16)
    flops = counter.get_total_flops() / batch
    for _ in range(warmup):
        train_step(model, opt, x, y, bf16)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, y, bf16)
    sync(device)
    return batch * steps / (time.perf_counter() - start), flops


def bf16_matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s (n x n x n), the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def time_to_accuracy(
    name: str, cfg: Config, prepared_dir: str, text_dir: str | None, target: float, stop_at_target: bool = False
) -> tuple[float | None, float, float]:
    """Train ``name`` with the default recipe; (seconds until test top-1 >= target or None,
    last test top-1, training seconds in all). ``stop_at_target``: stop at the first epoch that
    reaches it (the schedule still spans train.epochs, so the seconds to target are the same)."""
    import numpy as np
    from torch.utils.data import DataLoader

    from multifusion.data.dataset import SplitDataset, collate_batch, load_prepared
    from multifusion.evaluation.evaluate import predict_logits
    from multifusion.core.optim import adamw, warmup_cosine
    from multifusion.core.runtime import Runtime
    from multifusion.training.train import class_weights, epoch_order, rank_batches, train_one_epoch

    prepared = load_prepared(prepared_dir)
    k, train = len(prepared.classes), cfg.train
    torch.manual_seed(cfg.seed)
    if name == "hnf":
        text = TextFeatures.load(text_dir) if cfg.fusion.text else None
        model = build_model(cfg, prepared.classes, text)
    else:
        model = build_baseline(name, k, cfg.data.image_size)
    device = torch.device("cpu")
    train_set, test = SplitDataset(prepared, "train"), prepared.split_indices("test")
    steps = len(rank_batches(np.arange(len(train_set)), train.batch_size, 0, 1))
    opt = adamw(model, train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(train.warmup_epochs * steps, train.epochs * steps))
    weights = torch.tensor(class_weights(train_set.targets, k), dtype=torch.float32) if train.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=train.label_smoothing)
    runtime, seconds, reached, top1 = Runtime(0, 1, device, False), 0.0, None, 0.0
    for epoch in range(train.epochs):
        batches = rank_batches(epoch_order(train_set.targets, k, train.balance, cfg.seed, epoch), train.batch_size, 0, 1)
        loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate_batch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009)
        start = time.perf_counter()
        train_one_epoch(model, loader, opt, sched, criterion, train, gen, runtime)
        seconds += time.perf_counter() - start
        logits = predict_logits(model, prepared.images[test], cfg.evaluate.batch_size, device, cfg.evaluate.tta)
        top1 = float((logits.argmax(1) == prepared.labels(test)).mean())
        print(f"  {name} epoch {epoch + 1}: {seconds:.0f} s, test top-1 {top1:.3f}", flush=True)
        if reached is None and top1 >= target:
            reached = seconds
            if stop_at_target:
                break
    return reached, top1, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="hnf,vit_small,resnet18", help="comma list: hnf and/or baseline names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--image-size", type=int, default=None, help="default: data.image_size")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 10 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="default: 3 on CPU, 30 on CUDA")
    parser.add_argument("--to-accuracy", type=float, default=None, help="also train each model; seconds to this test top-1")
    parser.add_argument("--stop-at-target", action="store_true", help="--to-accuracy: stop each model at its first epoch on target")
    parser.add_argument("--prepared", default="data/prepared", help="prepared data for --to-accuracy")
    parser.add_argument("--text", default="data/text_features", help="text features for --to-accuracy")
    args = parser.parse_args()

    overrides = {"data.image_size": args.image_size} if args.image_size else {}
    cfg = load_config(args.params, overrides)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or cfg.train.batch_size
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    steps = args.steps or (30 if cuda else 3)
    size = cfg.data.image_size
    torch.manual_seed(cfg.seed)

    peak = bf16_matmul_peak(device) if cuda else None
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if cuda else "fp32"
    print(f"training throughput: {where}, {precision}, {size} px, batch {batch}, {warmup} warm-up + {steps} timed steps")
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")

    rows = []
    for name in args.models.split(","):
        model = make_model(name, cfg)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ips, flops = measure(model, batch, size, device, warmup, steps)
        rows.append((name, n_params, ips, flops))
        del model
        if cuda:
            torch.cuda.empty_cache()

    base = rows[0][2]
    head = f"{'model':<12} {'params':>12} {'GFLOP/img':>10} {'img/s':>10} {'ratio to ' + rows[0][0]:>14}"
    if cuda:
        head += f" {'TFLOP/s':>8} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for name, n_params, ips, flops in rows:
        line = f"{name:<12} {n_params:>12,} {flops / 1e9:>10.3f} {ips:>10.1f} {ips / base:>14.2f}"
        if cuda:
            achieved = flops * ips
            line += f" {achieved / 1e12:>8.2f} {achieved / peak:>6.1%}"
        print(line)

    if args.to_accuracy is not None:
        results = [(name, *time_to_accuracy(name, cfg, args.prepared, args.text, args.to_accuracy, args.stop_at_target)) for name, *_ in rows]
        base = results[0][1]
        head = f"{'model':<12} {'s to ' + format(args.to_accuracy, '.2f') + ' top-1':>16} {'ratio to ' + results[0][0]:>14} {'last top-1':>12} {'train s':>8}"
        print(f"\ntime to accuracy: {args.prepared}, {cfg.train.epochs} epochs, test-time policy tta={cfg.evaluate.tta}")
        print(head)
        print("-" * len(head))
        for name, reached, top1, seconds in results:
            ratio = f"{reached / base:.2f}" if reached is not None and base is not None else "–"
            shown = f"{reached:.0f}" if reached is not None else "not reached"
            print(f"{name:<12} {shown:>16} {ratio:>14} {top1:>12.3f} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
