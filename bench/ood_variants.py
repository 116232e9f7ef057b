"""What the ``knn_spectrum`` unknown score is made of: its terms, the texture profile's bands,
and how the terms combine, rescored on the models a ``bench/ood.py --work`` folder holds.

    python bench/ood_variants.py --ncm WS_NCM --syn WS_SYN --work WS/ood-scratch \\
        --ncm-model NCM_MODEL --syn-model SYN_MODEL

Every variant reads the identity view of each image (as ``predict`` does) and is a kNN
distance (k = ``--k``) to the train split, each term divided by its val 95th percentile:
``tokens`` (the penultimate features, L2-normalised: what ``knn`` reads), ``trunk stats``
(the per-channel mean and standard deviation of every graph-trunk block's feature map,
L2-normalised: a Gram-style texture descriptor), ``pooled`` (the trunk's pooled feature),
``profile<B>`` (the radially averaged log power spectrum in B bands). ``a + b`` sums the
scaled terms (``knn_spectrum`` before 2026-12-08), ``max(a, b)`` takes the larger (since).
AUROC, unknown = positive: near = the held-out NCM classes of h1-h3 against each model's
known test split; far = those models and the 11-class NCM model against the synthetic test
split, and the synthetic model against NCM's test split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ood import HOLDOUTS, split_of
from sklearn.metrics import roc_auc_score

from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.evaluation.ood import SCALE_QUANTILE, kth_distance
from multifusion.evaluation.spectrum import radial_log_spectrum
from multifusion.model.card import load_model

VARIANTS = {
    "tokens (knn)": [["tokens"]],
    "profile16": [["profile16"]],
    "profile32": [["profile32"]],
    "tokens + profile16 (before)": [["tokens", "profile16"]],
    "tokens + profile32": [["tokens", "profile32"]],
    "max(tokens, profile16)": [["tokens"], ["profile16"]],
    "max(tokens, profile32) (now)": [["tokens"], ["profile32"]],
    "pooled + profile32": [["pooled", "profile32"]],
    "max(pooled, profile32)": [["pooled"], ["profile32"]],
    "trunk stats": [["stats"]],
    "trunk stats + profile32": [["stats", "profile32"]],
    "max(trunk stats, profile32)": [["stats"], ["profile32"]],
}  # a list of sums; the score is the largest of them


@torch.no_grad()
def descriptors(model: torch.nn.Module, images: np.ndarray, batch: int = 128) -> dict[str, torch.Tensor]:
    """uint8 (N, S, S) -> {name: (N, D) float64} for every term above."""
    blocks = model.embed.stem.blocks  # the graph trunk's blocks, each (B, C, g, g)
    caught: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: caught.__setitem__(j, o)) for j, b in enumerate(blocks)]
    out: dict[str, list] = {"tokens": [], "pooled": [], "stats": []}
    try:
        for start in range(0, len(images), batch):
            x = to_model_input(np.asarray(images[start : start + batch]))  # (B, 1, S, S)
            out["pooled"].append(model.embed(x)[1])  # (B, global_dim)
            out["tokens"].append(model.forward_features(x).flatten(1))  # (B, L*C)
            out["stats"].append(torch.cat([torch.cat([o.mean((2, 3)), o.std((2, 3))], 1) for o in caught.values()], 1))
    finally:
        for h in hooks:
            h.remove()
    result = {k: F.normalize(torch.cat(v).double(), dim=1) for k, v in out.items()}
    for bands in (16, 32):
        result[f"profile{bands}"] = radial_log_spectrum(np.asarray(images), bands)
    return result


def score(d: dict, sums: list[list[str]], split: str, k: int) -> np.ndarray:
    terms = {}
    for name in {n for s in sums for n in s}:
        bank = d["train"][name]
        scale = np.quantile(kth_distance(d["val"][name], bank, k).numpy(), SCALE_QUANTILE)
        terms[name] = kth_distance(d[split][name], bank, k).numpy() / scale
    return np.max([sum(terms[n] for n in s) for s in sums], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ncm", type=Path, required=True)
    parser.add_argument("--syn", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="a bench/ood.py --work folder with h1..h3 trained")
    parser.add_argument("--ncm-model", type=Path, required=True)
    parser.add_argument("--syn-model", type=Path, required=True)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    ncm, syn = load_prepared(args.ncm / "data/prepared"), load_prepared(args.syn / "data/prepared")
    syn_test = split_of(syn, "test").images
    cases: dict[str, dict] = {}

    def add(name: str, model_dir: Path, prepared, unknown: dict[str, np.ndarray]) -> None:
        model = load_model(model_dir).model.eval()
        cases[name] = {s: descriptors(model, split_of(prepared, s).images) for s in ("train", "val", "test")}
        cases[name] |= {u: descriptors(model, x) for u, x in unknown.items()}

    for i, drop in enumerate(HOLDOUTS, 1):
        held = ncm.manifest["class_name"].isin(drop).to_numpy()
        add(f"h{i}", args.work / f"h{i}" / "model", load_prepared(args.work / f"h{i}" / "prepared"),
            {"near": np.asarray(ncm.images)[held], "far": syn_test})
    add("ncm", args.ncm_model, ncm, {"far": syn_test})
    add("syn", args.syn_model, syn, {"far": split_of(ncm, "test").images})
    columns = [("h1", "near"), ("h2", "near"), ("h3", "near"), None, ("h1", "far"), ("h2", "far"), ("h3", "far"), ("ncm", "far"),
               ("syn", "far")]
    print(f"AUROC, k = {args.k}, identity view\n{'variant':<30}" + "".join(
        f"{'mean near' if c is None else c[0] + ' ' + c[1]:>10}" for c in columns))
    for name, sums in VARIANTS.items():
        row = []
        for column in columns:
            if column is None:
                row.append(float(np.mean(row[:3])))
                continue
            d = cases[column[0]]
            known, unknown = score(d, sums, "test", args.k), score(d, sums, column[1], args.k)
            row.append(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown]))
        print(f"{name:<30}" + "".join(f"{v:>10.3f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
