"""Stage pretrain_image: self-supervised (BYOL) pretraining of the HNF image trunk on the train
split's micrographs (labels ignored) plus data.unlabeled, never a val or test image or a near-copy.

    python stages/pretrain_image.py --prepared data/prepared --out models/image_trunk --live dvclive/pretrain_image

pretrain.enabled false (the default): writes models/image_trunk/trunk.json = {"enabled": false}
and dvclive/pretrain_image/disabled.json, nothing else (seconds; train then starts from random
init, as before the stage existed). True: models/image_trunk/ = trunk.safetensors + trunk.json
(see multifusion.training.trunk) and the loss per epoch in dvclive/pretrain_image.
See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from dvclive import Live

from multifusion.core.config import load_config
from multifusion.core.errors import run_stage
from multifusion.core.json_files import write_json
from multifusion.core.runtime import apply_thread_env
from multifusion.core.timings import write_timing
from multifusion.data.dataset import load_prepared
from multifusion.data.unlabeled import pretrain_pool
from multifusion.training.trunk import DISABLED, save_trunk, trunk_args, write_disabled
from multifusion.training.pretrain_image import pretrain_trunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("models/image_trunk"))
    parser.add_argument("--live", type=Path, default=Path("dvclive/pretrain_image"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    if not cfg.pretrain.enabled:
        write_disabled(args.out)
        shutil.rmtree(args.live, ignore_errors=True)
        write_json(args.live / "disabled.json", DISABLED)
        print(f"pretrain_image: pretrain.enabled is false; wrote the marker {args.out}/trunk.json (train starts from random init)")
        return
    apply_thread_env()  # $MULTIFUSION_THREADS: cores // jobs when queued runs share the machine
    pool = pretrain_pool(load_prepared(args.prepared), cfg.data.unlabeled, cfg.data, progress=True)
    print(f"pretrain_image: {len(pool.images)} images ({pool.report['train_images']} train, {pool.report['unlabeled_images']} "
          f"unlabeled of {pool.report['unlabeled_files']} files); {len(pool.report['excluded'])} excluded as copies of val/test images")
    device = "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    with Live(str(args.live), dvcyaml=None, save_dvc_exp=False) as live:
        def log(epoch: int, metrics: dict[str, float]) -> None:
            live.step = epoch
            for name, value in metrics.items():
                live.log_metric(name, value)
            print(f"epoch {epoch + 1}/{cfg.pretrain.epochs}  loss {metrics['loss']:.4f}", flush=True)

        result = pretrain_trunk(pool.images, cfg, log=log, device=device)
    card = {
        "method": cfg.pretrain.method,
        "epochs": cfg.pretrain.epochs,
        "steps": result.steps,
        "architecture": trunk_args(cfg),
        "pretrain": {k: v for k, v in vars(cfg.pretrain).items() if k != "enabled"},
        "seed": cfg.seed,
        "loss": {"first_epoch": round(result.losses[0], 6), "last_epoch": round(result.losses[-1], 6)},
        "images": {"count": len(pool.images), "train": pool.report["train_images"], "unlabeled": pool.report["unlabeled_images"],
                   "sha256": pool.sha256},
        "excluded": pool.report["excluded"],
        "skipped": pool.report["skipped"],
        "duplicates": pool.report["duplicates"],
    }
    save_trunk(args.out, result.stem, card)
    write_timing("pretrain_image", result.seconds)  # not in the card, whose hash dvc.lock records
    print(f"pretrain_image: BYOL loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.steps} steps "
          f"({result.seconds:.0f} s); saved {args.out}")


if __name__ == "__main__":
    run_stage("pretrain_image", main)
