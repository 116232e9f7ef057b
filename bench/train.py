"""Training throughput: HNF (the params.yaml model) beside ViT-S and ResNet-18 at the same
image size and batch, in the same run.

    python bench/train.py                      # CPU here: fp32, batch train.batch_size
    python bench/train.py --device cuda        # bf16 autocast, FLOPs and MFU
    python bench/train.py --models hnf,vit_small,resnet18,resnet50,swin_tiny,vig --batch 128

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

from multifusion.config import Config, load_config
from multifusion.model import build_model
from multifusion.model.baselines import build_baseline
from multifusion.text.features import TextFeatures

NUM_CLASSES = 10


def random_text(cfg: Config, num_classes: int) -> TextFeatures:
    """Text features of the shape the pipeline's embed_text stage writes (values random)."""
    T, L, D = num_classes * len(cfg.llm.templates) * cfg.llm.samples, cfg.text.max_length, cfg.text.hidden
    lengths = torch.randint(L // 4, L + 1, (T,))
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (T, L)
    return TextFeatures(
        token_states=torch.randn(T, L, D),
        attention_mask=mask,
        sentence_embeddings=torch.randn(T, D),
        class_names=[f"class{t % num_classes}" for t in range(T)],
        templates=["t"] * T,
        samples=[0] * T,
    )


def make_model(name: str, cfg: Config) -> nn.Module:
    if name == "hnf":
        return build_model(cfg, NUM_CLASSES, random_text(cfg, NUM_CLASSES) if cfg.fusion.text else None)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="hnf,vit_small,resnet18", help="comma list: hnf and/or baseline names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--image-size", type=int, default=None, help="default: data.image_size")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 10 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="default: 3 on CPU, 30 on CUDA")
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


if __name__ == "__main__":
    main()
