"""A model's accuracy under the distribution shifts of ``multifusion.evaluation.shifts``.

``evaluate_under_shifts`` runs a model over the clean and shifted test images and returns
accuracy and macro-F1 per shift per severity; severity 0 of every shift is the clean
test split, so the table starts from the model's plain accuracy. ``robustness_table``
flattens the result into a long table (``multifusion.evaluation.robustness_plot`` draws it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from multifusion.core.config import Config
from multifusion.data.grey_levels import apply_grey_levels
from multifusion.evaluation.evaluate import classification_metrics, predict_probs
from multifusion.evaluation.shifts import SHIFTS, apply_shift


def _scores(probs: np.ndarray, labels: np.ndarray, cfg: Config) -> dict[str, float]:
    metrics = classification_metrics(probs, labels, cfg.evaluate.ece_bins)
    return {"accuracy": float(metrics["top1"]), "macro_f1": float(metrics["macro_f1"])}


def evaluate_under_shifts(
    model: torch.nn.Module,
    images_u8: np.ndarray,
    labels: np.ndarray,
    cfg: Config,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
    keep_predictions: bool = False,
    grey_levels: str | None = None,
) -> dict:
    """Accuracy and macro-F1 of ``model`` on clean and shifted copies of ``images_u8``.

    images_u8: uint8 (N, S, S) test images, preprocessed as in training; labels: (N,).
    Returns ``{"n_images": N, "clean": {accuracy, macro_f1},
    "shifts": {shift: {str(severity): {severity, level, accuracy, macro_f1}}}}`` with
    levels numbered 1.. in the params order (mildest first). A shifted image goes through the
    input's grey-level policy again (``grey_levels``: a loaded model's card, as ``predict`` applies
    it; None = ``cfg.data.grey_levels``, the policy a model trained from ``cfg`` has), as a
    micrograph taken under the shifted setting would in ``predict``. Deterministic from
    ``cfg.robustness.seed``. With ``keep_predictions`` also ``"labels"`` (N,) and, in the
    clean entry and every level's, the per-image ``"predictions"`` (N,): what a paired test
    between two models needs (the comparison report's per-level McNemar test).
    """
    rob = cfg.robustness
    policy = cfg.data.grey_levels if grey_levels is None else grey_levels
    images_u8 = np.ascontiguousarray(images_u8, dtype=np.uint8)
    labels = np.asarray(labels)

    def score(images: np.ndarray) -> dict:
        # single views: the 8-view test-time average would hide the rotation shift and cost 8x
        probs = predict_probs(model, images, rob.batch_size, device, temperature)  # (N, C)
        scores: dict = _scores(probs, labels, cfg)
        if keep_predictions:
            scores["predictions"] = probs.argmax(axis=1).astype(int).tolist()
        return scores

    result: dict = {"n_images": int(len(labels)), "clean": score(images_u8), "shifts": {}}
    if keep_predictions:
        result["labels"] = labels.astype(int).tolist()
    for shift_index, name in enumerate(SHIFTS):
        per_severity = {}
        for level, severity in enumerate(getattr(rob, name), start=1):
            rng = np.random.default_rng([rob.seed, shift_index, level])
            shifted = apply_grey_levels(apply_shift(name, images_u8, severity, rng), policy)
            per_severity[str(severity)] = {"severity": severity, "level": level, **score(shifted)}
        result["shifts"][name] = per_severity
    return result


def robustness_table(result: dict, model_name: str = "model") -> pd.DataFrame:
    """Long table: model, shift, level (0 = clean), severity, accuracy, macro_f1."""
    rows = []
    for shift, per_severity in result["shifts"].items():
        rows.append({"model": model_name, "shift": shift, "level": 0, "severity": 0.0, **result["clean"]})
        for entry in per_severity.values():
            rows.append({"model": model_name, "shift": shift, **entry})
    columns = ["model", "shift", "level", "severity", "accuracy", "macro_f1"]
    return pd.DataFrame(rows, columns=columns)
