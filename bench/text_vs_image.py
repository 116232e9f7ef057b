"""Do the descriptions say which classes look alike? The class-similarity structure of the
text set beside the one a trained model's image features show, on the same classes.

    python bench/text_vs_image.py --model models/hnf --prepared data/prepared --text data/text_features
    python bench/text_vs_image.py --model models/compare/mf_no_text/seed42 --prepared data/prepared --text data/text_features

Text: each description's token states mean-pooled under the mask (the sentence embedding
`embed_text` writes; (T, D)), averaged per class and L2-normalised -> cosine matrix (K, K).
Image: the model's visual tokens (``forward_features``, flattened: (N, L*C)) of the test
split, one view, averaged per class -> cosine matrix (K, K). Over the K(K-1)/2 class pairs it
prints the Spearman correlation of the two (scipy), and per class whether its nearest other
class is the same under both. A per-class text embedding can only help a classifier through
this structure (which classes to treat alike); a correlation near 0 says the descriptions'
notion of "alike" is not the images'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.model.card import load_model
from multifusion.text.features import TextFeatures


def class_cosine(vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """vectors (N, D), labels (N,) -> cosine similarity of the class means (K, K)."""
    means = np.stack([vectors[labels == k].mean(0) for k in range(num_classes)])  # (K, D)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return means @ means.T


def text_embeddings(text: TextFeatures) -> np.ndarray:
    """(T, D): each description's token states averaged over its real tokens."""
    mask = text.attention_mask.float().unsqueeze(-1)  # (T, L, 1)
    return ((text.token_states * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()


@torch.no_grad()
def image_features(model: torch.nn.Module, images_u8: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 images (N, S, S) -> the model's visual tokens, flattened (N, L*C), eval mode."""
    model.eval()
    chunks = [
        model.forward_features(to_model_input(np.asarray(images_u8[start : start + batch_size]))).flatten(1)
        for start in range(0, len(images_u8), batch_size)
    ]
    return torch.cat(chunks).numpy()


def compare_structure(text_sim: np.ndarray, image_sim: np.ndarray) -> tuple[float, float, list[tuple[int, int, int]]]:
    """Two (K, K) similarity matrices -> (Spearman rho over the class pairs, its p, per class
    (k, nearest other class by text, by image))."""
    upper = np.triu_indices(len(text_sim), k=1)
    rho, p = spearmanr(text_sim[upper], image_sim[upper])
    masked_text, masked_image = text_sim - 2 * np.eye(len(text_sim)), image_sim - 2 * np.eye(len(image_sim))
    nearest = [(k, int(masked_text[k].argmax()), int(masked_image[k].argmax())) for k in range(len(text_sim))]
    return float(rho), float(p), nearest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/hnf"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--text", type=Path, default=Path("data/text_features"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    prepared = load_prepared(args.prepared)
    text = TextFeatures.load(args.text)
    label = {name: i for i, name in enumerate(prepared.classes)}
    text_labels = np.array([label[name] for name in text.class_names])
    K = len(prepared.classes)
    text_sim = class_cosine(text_embeddings(text), text_labels, K)
    idx = prepared.split_indices(args.split)
    image_sim = class_cosine(image_features(load_model(args.model).model, prepared.images[idx], args.batch_size), prepared.labels(idx), K)
    rho, p, nearest = compare_structure(text_sim, image_sim)
    agree = sum(t == i for _, t, i in nearest)
    print(f"{args.model} on {args.prepared} ({args.split}, n={len(idx)}), text {args.text} ({len(text_labels)} descriptions)")
    print(f"class pairs: {K * (K - 1) // 2}; Spearman rho(text cosine, image cosine) = {rho:+.3f} (p = {p:.3f})")
    print(f"nearest other class the same by text and by image: {agree} / {K}")
    width = max(len(c) for c in prepared.classes)
    print(f"{'class':<{width}}  {'nearest by text':<{width}}  {'nearest by image':<{width}}")
    for k, t, i in nearest:
        print(f"{prepared.classes[k]:<{width}}  {prepared.classes[t]:<{width}}  {prepared.classes[i]:<{width}}")


if __name__ == "__main__":
    main()
