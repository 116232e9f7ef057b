"""Does the Grad-CAM overlay of a trained model point at the evidence? Two checks on real
micrographs, for the model ``predict --report`` explains (the model card's own input policy).

    python bench/gradcam_meaning.py --model models/hnf --prepared data/prepared \
        --out bench/results/gradcam_meaning_<date>.txt

1. **Two-material mosaics.** From the test split, pairs of images of two different classes
   that the model calls right on their own (one view). A mosaic takes the left half of
   image A and the right half of image B (and the mirror order, so that neither side is
   favoured). Explaining class A, the overlay's mass should sit on A's half; explaining
   class B, on B's half. Reported: the mean share of the overlay's mass on the explained
   class's half (chance 0.5) and the share of mosaics where it is above 0.5.
2. **Deletion** (Samek et al. 2017, "pixel flipping", in blocks). On test images the model
   calls right, replace the 25% of the image the overlay ranks highest by the image's mean
   grey, and, separately, the 25% it ranks lowest; the called class's probability should
   fall further in the first case. Reported: the mean drop of the calibrated probability
   for each, and the share of images where deleting the top quarter hurts more.

Both run on whatever model you give (a MultiFusion card or a baseline's), so a lab can run
them on its own model. ``tests/test_explain.py`` runs the mosaic check on a small MultiFusion it trains.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.evaluation.evaluate import softmax
from multifusion.inference.explain import explain_batch
from multifusion.model.card import load_model


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 (N, S, S) -> (N, K) logits of the identity view."""
    return np.concatenate([model(to_model_input(images[i : i + batch])).float().numpy() for i in range(0, len(images), batch)])


def called_right(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the one-view call is the label."""
    return logits_of(model, images).argmax(1) == labels


def mosaic_shares(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, pairs: int, seed: int = 0) -> np.ndarray:
    """images (N, S, S) uint8 that the model calls right, labels (N,) -> (2 * pairs * 2,) share
    of the overlay's mass on the half holding the explained class: mosaics [A | B] and
    [B | A], each explained for A and for B."""
    rng = np.random.default_rng(seed)
    S = images.shape[-1]
    half = S // 2
    shares = []
    for _ in range(pairs):
        i = int(rng.integers(len(images)))
        others = np.flatnonzero(labels != labels[i])
        j = int(rng.choice(others))
        for left, right in ((i, j), (j, i)):
            mosaic = np.concatenate([images[left][:, :half], images[right][:, half:]], axis=1)[None]  # (1, S, S)
            for target, side in ((labels[left], slice(0, half)), (labels[right], slice(half, S))):
                heat = explain_batch(model, mosaic, np.array([target])).heat[0]  # (S, S)
                total = heat.sum()
                shares.append(float(heat[:, side].sum() / total) if total > 0 else 0.5)
    return np.asarray(shares)


def deletion_drops(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, temperature: float,
                   fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """-> (drop of the called class's calibrated probability when the top ``fraction`` of the
    overlay is replaced by the image mean, the same for the bottom ``fraction``), each (N,)."""
    heat = np.concatenate([explain_batch(model, images[i : i + 32], labels[i : i + 32]).heat for i in range(0, len(images), 32)])
    base = softmax(logits_of(model, images), temperature)[np.arange(len(images)), labels]
    out = []
    for top in (True, False):
        edited = images.copy()
        for n, (image, h) in enumerate(zip(images, heat)):
            order = np.argsort(h.ravel())
            chosen = order[-int(fraction * h.size):] if top else order[: int(fraction * h.size)]
            flat = edited[n].reshape(-1)
            flat[chosen] = np.uint8(round(float(image.mean())))
        probs = softmax(logits_of(model, edited), temperature)[np.arange(len(images)), labels]
        out.append(base - probs)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=100, help="image pairs (4 explained mosaics each)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    prepared = load_prepared(args.prepared)
    idx = prepared.split_indices("test")
    images, labels = np.asarray(prepared.images[idx]), prepared.labels(idx)
    right = called_right(model, images, labels)
    images, labels = images[right], labels[right]
    started = time.perf_counter()
    shares = mosaic_shares(model, images, labels, args.pairs)
    top, bottom = deletion_drops(model, images, labels, loaded.temperature)
    lines = [
        f"=== bench/gradcam_meaning.py {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC: {args.model} "
        f"({loaded.model_name}, {len(loaded.classes)} classes), {args.prepared}: {len(images)} test images called right (one view)",
        f"mosaics ({args.pairs} pairs x 2 orders x 2 targets = {len(shares)} overlays): mass on the explained class's half "
        f"{shares.mean():.3f} (chance 0.5), above half in {np.mean(shares > 0.5):.3f} of them",
        f"deletion of 25% of the pixels: called-class probability drop {top.mean():+.3f} for the overlay's top quarter, "
        f"{bottom.mean():+.3f} for its bottom quarter; top hurts more on {np.mean(top > bottom):.3f} of images",
        f"({time.perf_counter() - started:.0f} s)",
    ]
    with args.out.open("a") as out:
        for line in lines:
            print(line)
            out.write(line + "\n")


if __name__ == "__main__":
    main()
