"""Probe (issue 29): k labels per class, the HNF model from its BYOL-pretrained trunk vs from
scratch, the same fine-tuning budget, one seed. Everything through the library the stages use.

    python bench/pretrain_probe.py --prepared data/prepared --work /tmp/probe --per-class 10 \
        --pretrain-epochs 2 --epochs 10 --out bench/results/pretrain_image_probe_<date>.txt

1. pretrain: ``pretrain_pool`` (the full train split, labels ignored, plus data.unlabeled; no
   val/test image or copy) -> ``pretrain_trunk`` (BYOL, pretrain.* of params.yaml but
   ``--pretrain-epochs``) -> ``save_trunk``;
2. ``write_low_label``: k labelled groups per class, val and test unchanged;
3. two arms on that set with train.* of params.yaml but ``--epochs``: scratch (random init) and
   pretrained (``start_from_trunk``), the same seed, so the same head initialisation and batches;
4. test top-1 and macro-F1 of each (``--tta`` for the 8-view policy; off by default to save time).
``--text`` keeps fusion.text as in params.yaml (it then needs data/text_features); off by default.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from multifusion.core.atomic import write_text
from multifusion.core.config import load_config
from multifusion.data.dataset import load_prepared
from multifusion.data.low_label import write_low_label
from multifusion.data.unlabeled import pretrain_pool
from multifusion.evaluation.evaluate import macro_scores, predict_logits
from multifusion.model import build_model
from multifusion.text.features import TextFeatures
from multifusion.training.pretrain_image import pretrain_trunk
from multifusion.training.train import fit
from multifusion.training.trunk import read_card, save_trunk, start_from_trunk, trunk_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the trunk, the subset and the models")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--draw", type=int, default=0, help="seed of the low-label draw")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of each arm")
    parser.add_argument("--trunk", type=Path, help="reuse this pretrained trunk (a models/image_trunk folder) instead of step 1")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--text", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    overrides = {"pretrain.enabled": True, "pretrain.epochs": args.pretrain_epochs, "train.epochs": args.epochs,
                 "evaluate.tta": args.tta}
    if not args.text:
        overrides["fusion.text"] = False
    cfg = load_config(args.params, overrides)
    lines = [f"threads {torch.get_num_threads()}; params {args.params} with {overrides}"]

    full = load_prepared(args.prepared)
    if args.trunk is None:
        pool = pretrain_pool(full, cfg.data.unlabeled, cfg.data)
        started = time.perf_counter()
        result = pretrain_trunk(pool.images, cfg, log=lambda e, m: print(f"pretrain epoch {e + 1}: loss {m['loss']:.4f}", flush=True))
        pretrain_s = time.perf_counter() - started
        trunk_dir = args.work / "image_trunk"
        save_trunk(trunk_dir, result.stem, {"method": cfg.pretrain.method, "epochs": cfg.pretrain.epochs,
                                            "architecture": trunk_args(cfg), "images": {"count": len(pool.images), "sha256": pool.sha256},
                                            "loss": [round(x, 4) for x in result.losses], "seconds": round(pretrain_s)})
        lines.append(f"pretrain: BYOL {args.pretrain_epochs} epochs ({result.steps} steps of {cfg.pretrain.batch_size}) on "
                     f"{len(pool.images)} images ({len(pool.report['excluded'])} excluded), loss per epoch "
                     f"{[round(x, 4) for x in result.losses]}, {pretrain_s:.0f} s")
    else:
        trunk_dir = args.trunk
        card = read_card(trunk_dir)
        lines.append(f"pretrain: the trunk of {trunk_dir} reused (BYOL {card['epochs']} epochs on {card['images']['count']} images, "
                     f"loss per epoch {card.get('loss')}, {card.get('seconds')} s)")

    subset = args.work / f"k{args.per_class}" / "prepared"
    counts = write_low_label(args.prepared, subset, args.per_class, args.draw)
    lines.append(f"labels: {args.per_class} groups per class (draw {args.draw}): {counts}")
    text = TextFeatures.load(args.prepared.parent / "text_features") if cfg.fusion.text else None
    test = full.split_indices("test")
    for arm in ("scratch", "pretrained"):
        torch.manual_seed(cfg.seed)  # as stages/train.py: the same initial weights in both arms, but the trunk's
        model = build_model(cfg, full.classes, text)
        if arm == "pretrained":
            start_from_trunk(model, cfg, trunk_dir)
        started = time.perf_counter()
        model = fit(model, cfg, subset, args.work / arm / "model", args.work / arm / "checkpoints", args.work / arm / "live", arm, text=text)
        seconds = time.perf_counter() - started
        logits = predict_logits(model, np.asarray(full.images)[test], cfg.evaluate.batch_size, "cpu", cfg.evaluate.tta)
        labels = full.labels(test)
        top1 = float((logits.argmax(1) == labels).mean())
        _, _, f1 = macro_scores(labels, logits.argmax(1))
        lines.append(f"{arm:10s}: test top-1 {top1:.3f}  macro-F1 {f1:.3f}  ({len(test)} test images; fine-tuning {seconds:.0f} s)")
        print(lines[-1], flush=True)
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
