"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits, fitted
only where the validation data support it.

Dividing by T never changes the argmax, so accuracy is untouched; only the confidence is
recalibrated. The NLL of softmax(z / T) is convex in 1/T, hence unimodal in log T: the
fit is a golden-section search for the NLL minimum over log T in [log T_MIN, log T_MAX].

A small validation split can make the fit collapse: with every validation image right
the NLL keeps falling as T -> 0 (a real run fitted T = 0.03 on 5 source micrographs and
its test NLL went from 1.37 to 36.9). So :func:`calibrate_temperature` keeps T = 1 unless
1. some validation image is misclassified (else no finite T is supported),
2. there are at least MIN_GROUPS independent groups (source micrographs) to cross-validate, and
3. T fitted on the other folds lowers the NLL of each held-out fold, summed over folds
   (folds are whole groups, so near-copies never sit on both sides),
and records which rule decided, in words (``TemperatureFit.reason``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from multifusion.data.split import MIN_GROUPS  # independent validation groups needed to cross-validate the fit

T_MIN, T_MAX = 0.1, 10.0   # a sane range: sharpen or soften the logits at most 10x
FOLDS = 5
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float          # the T to use: the fitted one, or 1.0 when the fit is not supported
    fitted: bool                # whether ``temperature`` came from the fit
    reason: str                 # the decision in words (for eval.json)
    candidate: float            # T fitted on all of val, bounded (1.0 when nothing was fitted)
    cv_nll: float | None        # held-out NLL, summed over folds / n, with the folds' fitted T
    cv_nll_uncalibrated: float | None  # the same at T = 1
    n: int                      # validation images
    groups: int                 # independent groups among them

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def nll(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under softmax(logits (N, C) / T)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    return float(F.cross_entropy(logits / temperature, labels))


def fit_bounded(logits: torch.Tensor, labels: torch.Tensor, tol: float = 1e-9) -> float:
    """argmin over T in [T_MIN, T_MAX] of NLL(softmax(logits / T), labels): golden-section
    search on log T (the NLL is unimodal there). logits (N, C) float64, labels (N,)."""
    def loss(log_t: float) -> float:
        return float(F.cross_entropy(logits * math.exp(-log_t), labels))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = loss(b)
    best = min((loss(x), x) for x in (lo, hi, (lo + hi) / 2))[1]
    return min(max(math.exp(best), T_MIN), T_MAX)  # exp(log(T_MAX)) may round above T_MAX


def group_folds(groups: np.ndarray, folds: int) -> list[np.ndarray]:
    """Boolean masks (N,) of ``folds`` held-out folds made of whole groups, seed-fixed."""
    unique = np.unique(groups)
    order = np.random.default_rng(0).permutation(len(unique))
    return [np.isin(groups, unique[part]) for part in np.array_split(order, folds)]


def _cross_validate(logits: torch.Tensor, labels: torch.Tensor, groups: np.ndarray, folds: int) -> tuple[float, float]:
    """Held-out NLL (mean over all images) with T fitted on the other folds, and at T = 1."""
    fitted = plain = 0.0
    for held in group_folds(groups, folds):
        held_t = torch.as_tensor(held)
        t = fit_bounded(logits[~held_t], labels[~held_t])
        fitted += float(F.cross_entropy(logits[held_t] / t, labels[held_t], reduction="sum"))
        plain += float(F.cross_entropy(logits[held_t], labels[held_t], reduction="sum"))
    return fitted / len(labels), plain / len(labels)


def calibrate_temperature(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, groups: np.ndarray | None = None
) -> TemperatureFit:
    """Fit T on validation logits (N, C) and labels (N,) where the data support it (see the
    module docstring); ``groups`` (N,): independent-group ids (None: every image its own)."""
    logits = torch.as_tensor(logits, dtype=torch.float64).detach()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n = len(labels)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    n_groups = len(np.unique(groups))

    def keep(reason: str, candidate: float = 1.0, cv: tuple[float | None, float | None] = (None, None)) -> TemperatureFit:
        return TemperatureFit(1.0, False, reason, candidate, cv[0], cv[1], n, n_groups)

    if n == 0:
        return keep("no validation images: T kept at 1")
    if bool((logits.argmax(1) == labels).all()):
        return keep(f"all {n} validation images are classified correctly: the NLL keeps falling as T -> 0, "
                    "so no temperature is supported; T kept at 1")
    if n_groups < MIN_GROUPS:
        return keep(f"only {n_groups} independent validation group(s), fewer than {MIN_GROUPS} to cross-validate "
                    "a temperature; T kept at 1")
    candidate = fit_bounded(logits, labels)
    folds = min(FOLDS, n_groups)
    cv = _cross_validate(logits, labels, groups, folds)
    if not cv[0] < cv[1]:
        return keep(f"a fitted T does not lower the held-out NLL ({cv[0]:.4f} vs {cv[1]:.4f} at T = 1, "
                    f"{folds}-fold cross-validation over {n_groups} groups); T kept at 1", candidate, cv)
    at_bound = any(math.isclose(candidate, b, rel_tol=1e-6) for b in (T_MIN, T_MAX))
    bound = f" (at the bound of [{T_MIN}, {T_MAX}])" if at_bound else ""
    return TemperatureFit(candidate, True, f"held-out NLL {cv[1]:.4f} -> {cv[0]:.4f} ({folds}-fold cross-validation over "
                          f"{n_groups} groups); T = {candidate:.4g}{bound}", candidate, cv[0], cv[1], n, n_groups)


def fit_temperature(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, groups: np.ndarray | None = None
) -> float:
    """The temperature to use: :func:`calibrate_temperature`'s, 1.0 where no fit is supported."""
    return calibrate_temperature(logits, labels, groups).temperature


def calibration_summary(record: dict[str, object] | None) -> dict[str, object]:
    """The eval.json fields on how the model's temperature was chosen (``record``: the
    ``calibration`` entry of its config.json, None for a model saved without one)."""
    if record is None:
        return {"temperature_fitted": None, "temperature_reason": "not recorded: the model was saved without its "
                "calibration record (train with `save_model(..., calibration=fit.to_dict())`)"}
    return {"temperature_fitted": bool(record["fitted"]), "temperature_reason": str(record["reason"])}
