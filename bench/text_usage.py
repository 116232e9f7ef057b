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
per-class bias), top-1 and macro-F1 with that term alone, and top-1 and macro-F1 of the whole
logits without it. ``--tta`` averages every term over the 8 flips/rotations (the test-time
policy of ``evaluate.tta``), so the whole-logits row is the model's evaluated score; without
it, single views.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.evaluation.evaluate import dihedral_views
from multifusion.model.fusion import CrossModalHead
from multifusion.model.card import load_model


@torch.no_grad()
def logit_terms(model: torch.nn.Module, images_u8: np.ndarray, batch_size: int, tta: bool) -> dict[str, np.ndarray]:
    """uint8 images (N, S, S) -> {term: (N, K)} of the model's cross-modal head, eval mode;
    ``tta``: each term averaged over the 8 dihedral views, as evaluate averages the logits."""
    model.eval()
    text = model.text_embeddings()  # (T, C): the same for every image
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images_u8), batch_size):
        x = to_model_input(np.asarray(images_u8[start : start + batch_size]))  # (B, 1, S, S)
        views = dihedral_views(x) if tta else [x]
        per_view = [model.head.logit_terms(model.forward_features(v), text) for v in views]
        for name in per_view[0]:
            chunks.setdefault(name, []).append(sum(terms[name] for terms in per_view) / len(views))  # (B, K)
    return {name: torch.cat(values).numpy() for name, values in chunks.items()}


def image_share(logits: np.ndarray) -> float:
    """logits (N, K) -> the share of their variance that changes with the image; the rest is a
    per-class constant (a bias, the same for every image)."""
    per_image = float(logits.var(0).mean())  # mean over classes of the variance across images
    per_class = float(logits.mean(0).var())  # variance across classes of the class means
    return per_image / (per_image + per_class)


def usage_table(terms: dict[str, np.ndarray], labels: np.ndarray) -> list[tuple[str, float, float, float, float, float, float]]:
    """(term, spread, image share, top-1 and macro-F1 alone, top-1 and macro-F1 without it) per
    term, then the whole logits."""
    total = sum(terms.values())  # (N, K)
    classes = np.arange(total.shape[1])

    def scores(logits: np.ndarray) -> tuple[float, float]:
        predicted = logits.argmax(1)
        return float((predicted == labels).mean()), float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0))

    rows = [(name, float(t.std(1).mean()), image_share(t), *scores(t), *scores(total - t)) for name, t in terms.items()]
    return rows + [("all", float(total.std(1).mean()), image_share(total), *scores(total), float("nan"), float("nan"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/hnf"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tta", action="store_true", help="average each term over the 8 flips/rotations (evaluate.tta)")
    args = parser.parse_args()

    loaded = load_model(args.model)
    if not isinstance(getattr(loaded.model, "head", None), CrossModalHead):
        raise SystemExit(f"{args.model}: not a MultiFusion with the cross-modal head (fusion.mode mha, fusion.text true)")
    prepared = load_prepared(args.prepared)
    idx = prepared.split_indices(args.split)
    terms = logit_terms(loaded.model, prepared.images[idx], args.batch_size, args.tta)
    print(f"{args.model} on {args.prepared} ({args.split}, n={len(idx)}, {'8-view average' if args.tta else 'single view'})")
    print(f"{'term':<14}{'spread':>8}{'image share':>13}{'alone: top-1':>14}{'F1':>7}{'without: top-1':>16}{'F1':>7}")
    for name, spread, share, top1_alone, f1_alone, top1_without, f1_without in usage_table(terms, prepared.labels(idx)):
        print(f"{name:<14}{spread:>8.3f}{share:>13.3f}{top1_alone:>14.3f}{f1_alone:>7.3f}{top1_without:>16.3f}{f1_without:>7.3f}")


if __name__ == "__main__":
    main()
