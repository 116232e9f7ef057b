"""What ``train`` fits for screening once the final weights and temperature are fixed: the
unknown-material score (``ood.*`` params) and the val risk-coverage curve.

    entry = fit_screening(model, prepared, cfg, temperature, device, "models/hnf")
    save_model(..., unknown=entry)

The score's statistics come from the train split (identity view: the penultimate features
:mod:`multifusion.inference.views` hands the score at predict time, and the images' texture profiles); the threshold and the
risk-coverage curve from the val split under the view policy ``predict`` uses
(``evaluate.tta`` with ``predict.first_views`` / ``predict.view_confidence``). Tensors go to
``unknown.safetensors`` in ``out_dir``; the returned card entry holds the rest, the curve
under ``"selective"`` and the view policy under ``"views"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from multifusion.core.config import Config
from multifusion.data.dataset import Prepared
from multifusion.evaluation.evaluate import softmax
from multifusion.evaluation.ood import fit_unknown, save_unknown_tensors
from multifusion.evaluation.selective import risk_coverage
from multifusion.inference.views import ViewPolicy, screen_outputs


def fit_screening(
    model: nn.Module, prepared: Prepared, cfg: Config, temperature: float, device: str | torch.device, out_dir: str | Path
) -> dict[str, Any]:
    """Fit the unknown score and the val risk-coverage curve; write the tensors; -> the card's ``"unknown"`` entry."""
    train_idx, val_idx = prepared.split_indices("train"), prepared.split_indices("val")
    batch = cfg.evaluate.batch_size
    views = ViewPolicy.of(cfg.predict)  # predict's views and precision: the features and calls predict will score
    train_out = screen_outputs(model, prepared.images[train_idx], batch, device, temperature, False, views)  # features only
    policy = {"tta": cfg.evaluate.tta, "first_views": views.first, "view_confidence": views.confidence,
              "precision": views.precision, "bf16": views.bf16_on(torch.device(device))}  # the card's record
    val_out = screen_outputs(model, prepared.images[val_idx], batch, device, temperature, cfg.evaluate.tta, views)
    val_labels = prepared.labels(val_idx)  # (V,)
    fitted = fit_unknown(
        cfg.ood.score, cfg.ood.keep_rate,
        torch.from_numpy(train_out.features), torch.from_numpy(prepared.labels(train_idx)), len(prepared.classes),
        torch.from_numpy(val_out.logits), torch.from_numpy(val_out.features), temperature, cfg.ood.knn_k,
        torch.from_numpy(train_out.spectra), torch.from_numpy(val_out.spectra),
    )
    entry = save_unknown_tensors(out_dir, fitted)
    probs = softmax(val_out.logits, temperature)  # (V, K)
    curve = risk_coverage(probs.max(axis=1), probs.argmax(axis=1) == val_labels)
    return entry | {"selective": curve.record(), "views": policy, "val_views_mean": float(np.mean(val_out.views))}
