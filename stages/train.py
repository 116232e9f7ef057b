"""Stage train: build the MultiFusion model and train it on the prepared micrographs.

    python stages/train.py --prepared data/prepared --text data/text_features --out models/hnf \
        --checkpoints checkpoints/train --live dvclive/train --trunk models/image_trunk

A killed run resumes from --checkpoints (kept by DVC: persist). Under torchrun
(WORLD_SIZE > 1) it trains with DDP: `torchrun --nproc_per_node 2 stages/train.py`.
With pretrain.enabled the stem starts from --trunk (stage pretrain_image; multifusion.training.trunk).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.core.runtime import apply_thread_env
from multifusion.data.dataset import load_prepared
from multifusion.model import build_model
from multifusion.training.trunk import start_from_trunk
from multifusion.text.features import TextFeatures
from multifusion.training.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--text", type=Path, default=Path("data/text_features"))
    parser.add_argument("--out", type=Path, default=Path("models/hnf"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/train"))
    parser.add_argument("--live", type=Path, default=Path("dvclive/train"))
    parser.add_argument("--trunk", type=Path, default=Path("models/image_trunk"), help="read only when pretrain.enabled")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    apply_thread_env()  # $MULTIFUSION_THREADS: cores // jobs when queued runs share the machine
    classes = load_prepared(args.prepared).classes
    text = TextFeatures.load(args.text) if cfg.fusion.text else None
    torch.manual_seed(cfg.seed)  # the initial weights are part of the run (and of its checkpoint fingerprint)
    model = start_from_trunk(build_model(cfg, classes, text), cfg, args.trunk)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train: MultiFusion, {n_params:,} trainable parameters, {len(classes)} classes")
    fit(model, cfg, args.prepared, args.out, args.checkpoints, args.live, "hnf", text=text)


if __name__ == "__main__":
    run_stage("train", main)
