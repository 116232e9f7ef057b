"""How much a trained MultiFusion uses the text: its logits split into the cross-modal head's
three terms, each scored on the test split on its own and left out.

    python bench/text_usage.py --model models/hnf --prepared data/prepared
    python bench/text_usage.py --model /path/ncm/models/hnf --prepared /path/ncm/data/prepared

The head (``fusion.mode: mha``) adds three (B, K) terms (``CrossModalHead.logit_terms``):
``visual`` (a classifier on the visual tokens, no text), ``descriptions`` (each class's
descriptions' match with the image after text-to-visual attention) and ``prototypes``
(scaled cosine to the class text prototypes). Per term the table gives its spread (the
mean over images of the standard deviation over classes: how far it can move a decision),
its image share (the part of its variance that changes with the image; the rest is a
per-class bias), top-1 with that term alone, and top-1 of the whole logits without it. Single views (no
test-time averaging), so the whole-logits row is the model's one-view top-1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.model.fusion import CrossModalHead
from multifusion.saved_model import load_model


@torch.no_grad()
def logit_terms(model: torch.nn.Module, images_u8: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """uint8 images (N, S, S) -> {term: (N, K)} of the model's cross-modal head, eval mode."""
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images_u8), batch_size):
        x = to_model_input(np.asarray(images_u8[start : start + batch_size]))  # (B, 1, S, S)
        terms = model.head.logit_terms(model.forward_features(x), model.text_embeddings())  # {term: (B, K)}
        for name, value in terms.items():
            chunks.setdefault(name, []).append(value)
    return {name: torch.cat(values).numpy() for name, values in chunks.items()}


def image_share(logits: np.ndarray) -> float:
    """logits (N, K) -> the share of their variance that changes with the image; the rest is a
    per-class constant (a bias, the same for every image)."""
    per_image = float(logits.var(0).mean())  # mean over classes of the variance across images
    per_class = float(logits.mean(0).var())  # variance across classes of the class means
    return per_image / (per_image + per_class)


def usage_table(terms: dict[str, np.ndarray], labels: np.ndarray) -> list[tuple[str, float, float, float, float]]:
    """(term, spread, image share, top-1 alone, top-1 without it) per term, then the whole logits."""
    total = sum(terms.values())  # (N, K)

    def top1(logits: np.ndarray) -> float:
        return float((logits.argmax(1) == labels).mean())

    rows = [(name, float(t.std(1).mean()), image_share(t), top1(t), top1(total - t)) for name, t in terms.items()]
    return rows + [("all", float(total.std(1).mean()), image_share(total), top1(total), float("nan"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/hnf"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    loaded = load_model(args.model)
    if not isinstance(getattr(loaded.model, "head", None), CrossModalHead):
        raise SystemExit(f"{args.model}: not a MultiFusion with the cross-modal head (fusion.mode mha, fusion.text true)")
    prepared = load_prepared(args.prepared)
    idx = prepared.split_indices(args.split)
    terms = logit_terms(loaded.model, prepared.images[idx], args.batch_size)
    print(f"{args.model} on {args.prepared} ({args.split}, n={len(idx)}, single view)")
    print(f"{'term':<14}{'spread':>8}{'image share':>13}{'top-1 alone':>13}{'top-1 without':>15}")
    for name, spread, share, alone, without in usage_table(terms, prepared.labels(idx)):
        print(f"{name:<14}{spread:>8.3f}{share:>13.3f}{alone:>13.3f}{without:>15.3f}")


if __name__ == "__main__":
    main()
