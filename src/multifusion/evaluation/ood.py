"""The unknown-material score: how unlike the training micrographs an input is.

Five scores, every one "higher = more unknown" (pure torch; shapes in the docstrings):

- ``max_softmax`` (the floor; Hendrycks & Gimpel 2017): 1 - max_k softmax(logits / T)_k.
- ``energy`` (Liu et al. 2020): -T * logsumexp(logits / T), the free energy of the logits.
- ``knn`` (Sun et al. 2022): the distance from the L2-normalised penultimate feature to
  its k-th nearest neighbour among the normalised features of the training split.
- ``mahalanobis`` (Lee et al. 2018): the smallest squared Mahalanobis distance to a class
  mean of the training features, under one covariance shared by the classes (pinv).
- ``knn_spectrum`` (the default): the larger of two distances, each divided by its own 95th
  percentile on val so that neither dominates by its units: the ``knn`` distance, and the
  distance from the image's texture-scale profile (:mod:`multifusion.evaluation.spectrum`)
  to its k-th nearest among the training images' profiles. The features say what the
  classifier learned; the profile says how far the texture is from any training micrograph,
  which a model trained on few classes does not always see in its features. An image is as
  unknown as the stranger of the two: the sum of the earlier version let a familiar term
  dilute a far one (bench/ood.py, NCM held-out classes: mean AUROC 0.807 with the sum of
  16-band profiles, 0.881 with the larger of 32-band ones; docs/screening.md has the figures).
  Cards fitted before record neither ``bands`` nor ``combine`` and keep scoring as they were
  fitted (16 bands, the sum).

Penultimate features are what the classifier reads just before its last linear layer: a
MultiFusion model's visual tokens ``forward_features(x)`` (B, L(+1), C) flattened, a
baseline's ``forward_head(forward_features(x), pre_logits=True)`` (B, D).

Fitting (:func:`fit_unknown`, at the end of ``train``): the score's statistics come from the
train split; the threshold is the ``keep_rate`` quantile of the val split's scores, so that
``keep_rate`` of in-distribution images score at or below it and are kept as known. The
statistics that are tensors (the kNN bank, the class means and precision) go to
``unknown.safetensors`` in the model directory; the small rest (score, threshold, keep
rate, the val unknown fraction, the file's sha256) is the model card's ``"unknown"`` entry.

Drift (:func:`drift_test`): a batch whose unknown fraction is far above val's is flagged by a
one-sided binomial test against ``val_unknown_fraction``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import binom

from multifusion.core.atomic import atomic_path
from multifusion.core.config import OOD_SCORES
from multifusion.core.errors import UserError
from multifusion.evaluation.spectrum import BANDS

TENSORS = "unknown.safetensors"
FEATURE_SCORES = ("knn", "mahalanobis", "knn_spectrum")   # the scores that read penultimate features (and keep tensors)
SCALE_QUANTILE = 0.95                       # knn_spectrum: each term is divided by this quantile of its val distances
COMBINE = ("max", "sum")                    # knn_spectrum: how the two scaled terms make the score (max since 2026-12-08)
LEGACY_SPECTRUM = {"bands": 16, "combine": "sum"}  # knn_spectrum cards fitted before the card recorded these
REDO = "copy the whole model directory again, or retrain it (`dvc repro train`)"


class UnknownScoreError(UserError, ValueError):
    """Unknown-score statistics that cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------
# The scores


def max_softmax_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (N, K) -> (N,) 1 - max softmax(logits / T): 0 for a certain call, 1 - 1/K at most."""
    return 1.0 - torch.softmax(logits.double() / temperature, dim=1).max(dim=1).values


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (N, K) -> (N,) free energy -T * logsumexp(logits / T) (lower logits everywhere = higher)."""
    return -temperature * torch.logsumexp(logits.double() / temperature, dim=1)


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) rows scaled to unit L2 norm (float64)."""
    return F.normalize(features.double(), dim=1)


def kth_distance(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """queries (N, D), bank (M, D) -> (N,) Euclidean distance from each query to its k-th
    nearest bank row (float64). k must be in [1, M]."""
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"knn: k = {k} must be between 1 and the bank's {bank.shape[0]} rows; lower ood.knn_k in params.yaml")
    queries, bank = queries.double(), bank.double()
    bank_sq = bank.square().sum(dim=1)  # (M,)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]  # (n, D)
        d2 = (q.square().sum(dim=1, keepdim=True) - 2.0 * q @ bank.t() + bank_sq).clamp(min=0.0)  # (n, M) |a - b|^2
        out.append(d2.topk(k, dim=1, largest=False).values[:, k - 1].sqrt())  # (n,)
    return torch.cat(out) if out else queries.new_zeros(0)


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """features (N, D), bank (M, D) of unit rows (:func:`normalize_features` of the train
    features) -> (N,) Euclidean distance from each normalised feature to its k-th nearest
    bank row. k must be in [1, M]."""
    return kth_distance(normalize_features(features), bank, k, chunk)


def knn_spectrum_score(features: torch.Tensor, spectra: torch.Tensor, bank: torch.Tensor, spectrum_bank: torch.Tensor,
                       k: int, scales: tuple[float, float], combine: str = "max") -> torch.Tensor:
    """features (N, D), texture profiles (N, B), the train banks (M, D) unit rows and (M, B),
    scales (feature term, profile term) -> (N,) max (or sum) of knn / scales[0] and profile kNN / scales[1]."""
    if spectra.shape[1:] != spectrum_bank.shape[1:]:
        raise ValueError(f"knn_spectrum: texture profiles of {spectra.shape[1]} bands against a bank of {spectrum_bank.shape[1]}; "
                         "compute them with radial_log_spectrum(images, bands=<the fitted score's bands>)")
    terms = torch.stack([knn_score(features, bank, k) / scales[0], kth_distance(spectra, spectrum_bank, k) / scales[1]])  # (2, N)
    if combine == "max":
        return terms.max(dim=0).values
    if combine == "sum":
        return terms.sum(dim=0)
    raise ValueError(f"knn_spectrum: combine {combine!r}; allowed {', '.join(COMBINE)}")


def class_means_and_precision(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """features (N, D), labels (N,) -> (class means (K, D), shared precision (D, D)): the
    pseudo-inverse of the pooled within-class covariance (divided by N, as Lee et al.)."""
    x = features.double()
    counts = torch.bincount(labels, minlength=num_classes)  # (K,)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"mahalanobis: classes {missing} have no training image; every class needs one (check data.split)")
    means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x) / counts[:, None]  # (K, D)
    centred = x - means[labels]  # (N, D)
    covariance = centred.t() @ centred / len(x)  # (D, D)
    return means, torch.linalg.pinv(covariance, hermitian=True)


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """features (N, D), means (K, D), precision (D, D) -> (N,) min_k (f - mu_k)^T P (f - mu_k)."""
    diff = features.double()[:, None, :] - means.double()[None]  # (N, K, D)
    d2 = torch.einsum("nkd,de,nke->nk", diff, precision.double(), diff)  # (N, K)
    return d2.min(dim=1).values


# ---------------------------------------------------------------------------------------
# A fitted score: statistics, threshold, and how it scores new outputs


@dataclass
class UnknownScore:
    """A fitted unknown-material score (the card's ``"unknown"`` entry plus its tensors)."""

    score: str                           # one of OOD_SCORES
    threshold: float                     # score > threshold -> unknown
    keep_rate: float                     # the share of val images the threshold was chosen to keep
    val_unknown_fraction: float          # the share of val images scoring above the threshold
    temperature: float = 1.0             # the logit scores' temperature (the model's calibrated one)
    knn_k: int = 1                       # knn, knn_spectrum: which neighbour
    n_val: int = 0                       # val images the threshold was chosen on
    scales: tuple[float, float] = (1.0, 1.0)  # knn_spectrum: the val SCALE_QUANTILE of the feature and profile distances
    bands: int = BANDS                   # knn_spectrum: the texture profile's bands (the spectra it reads must have as many)
    combine: str = "max"                 # knn_spectrum: max or sum of the two scaled terms
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # knn: bank (M, D); knn_spectrum: bank (M, D), spectrum_bank (M, B); mahalanobis: means (K, D), precision (D, D)

    def __call__(self, logits: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray | None,
                 spectra: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """logits (N, K) under the model's test-time policy, penultimate features (N, D), texture
        profiles (N, B) (knn_spectrum only) -> scores (N,)."""
        logits = torch.as_tensor(np.asarray(logits))
        if self.score == "max_softmax":
            return max_softmax_score(logits, self.temperature).numpy()
        if self.score == "energy":
            return energy_score(logits, self.temperature).numpy()
        if features is None:
            raise ValueError(f"the {self.score} score needs the penultimate features")
        features = torch.as_tensor(np.asarray(features))
        if self.score == "knn":
            return knn_score(features, self.tensors["bank"], self.knn_k).numpy()
        if self.score == "knn_spectrum":
            if spectra is None:
                raise ValueError("the knn_spectrum score needs the images' texture profiles (multifusion.evaluation.spectrum)")
            return knn_spectrum_score(features, torch.as_tensor(np.asarray(spectra)), self.tensors["bank"],
                                      self.tensors["spectrum_bank"], self.knn_k, self.scales, self.combine).numpy()
        return mahalanobis_score(features, self.tensors["means"], self.tensors["precision"]).numpy()

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """scores (N,) -> (N,) bool: unknown where the score exceeds the threshold."""
        return np.asarray(scores) > self.threshold

    def record(self, sha256: str | None = None) -> dict[str, Any]:
        """The card's ``"unknown"`` entry (``tensors``: the file's name and sha256, when any)."""
        entry: dict[str, Any] = {
            "score": self.score, "threshold": float(self.threshold), "keep_rate": float(self.keep_rate),
            "val_unknown_fraction": float(self.val_unknown_fraction), "n_val": int(self.n_val),
            "temperature": float(self.temperature),
        }
        if self.score in ("knn", "knn_spectrum"):
            entry["knn_k"] = int(self.knn_k)
        if self.score == "knn_spectrum":
            entry |= {"scales": [float(s) for s in self.scales], "bands": int(self.bands), "combine": self.combine}
        if self.tensors:
            entry["tensors"] = {"file": TENSORS, "sha256": sha256, "shapes": {k: list(v.shape) for k, v in self.tensors.items()}}
        return entry


def keep_threshold(val_scores: np.ndarray, keep_rate: float) -> float:
    """A threshold t with at least ``keep_rate`` of ``val_scores`` (N,) at or below it and no
    more than needed: midway between the ceil(keep_rate * N)-th smallest score and the next
    (so that float noise of 1e-6 between two runs of the same model flips no val image; the
    largest score when every image is kept)."""
    scores = np.sort(np.asarray(val_scores, dtype=np.float64))
    if len(scores) == 0:
        raise ValueError("keep_threshold: no val scores; the val split must hold images (check data.split)")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"ood.keep_rate must be in (0, 1], got {keep_rate}")
    rank = max(1, math.ceil(keep_rate * len(scores) - 1e-9))  # images kept, at least
    return float(scores[rank - 1] if rank == len(scores) else (scores[rank - 1] + scores[rank]) / 2)


def fit_unknown(
    score: str,
    keep_rate: float,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    val_logits: torch.Tensor,
    val_features: torch.Tensor,
    temperature: float = 1.0,
    knn_k: int = 1,
    train_spectra: torch.Tensor | None = None,
    val_spectra: torch.Tensor | None = None,
) -> UnknownScore:
    """Fit ``score`` on the train split's penultimate features (N, D), labels (N,) and texture
    profiles (N, B) (knn_spectrum); choose the threshold on the val split's logits (V, K),
    features (V, D) and profiles (V, B) to keep ``keep_rate``."""
    if score not in OOD_SCORES:
        raise ValueError(f"ood.score {score!r}: allowed {', '.join(OOD_SCORES)}")
    tensors: dict[str, torch.Tensor] = {}
    k = min(knn_k, len(train_features))  # a tiny train split holds fewer neighbours
    scales = (1.0, 1.0)
    if score in ("knn", "knn_spectrum"):
        tensors["bank"] = normalize_features(train_features).float()  # (N, D)
    if score == "knn_spectrum":
        if train_spectra is None or val_spectra is None:
            raise ValueError("knn_spectrum: fit_unknown needs the train and val texture profiles")
        tensors["spectrum_bank"] = train_spectra.double()  # (N, B)
        feature_d = knn_score(val_features, tensors["bank"], k).numpy()  # (V,)
        profile_d = kth_distance(val_spectra, tensors["spectrum_bank"], k).numpy()  # (V,)
        scales = tuple(max(float(np.quantile(d, SCALE_QUANTILE)), 1e-12) for d in (feature_d, profile_d))
    elif score == "mahalanobis":
        means, precision = class_means_and_precision(train_features, train_labels.long(), num_classes)
        tensors = {"means": means, "precision": precision}
    bands = BANDS if train_spectra is None else int(train_spectra.shape[1])
    fitted = UnknownScore(score, 0.0, keep_rate, 0.0, temperature, k, len(val_logits), scales, bands, "max", tensors)
    val_scores = fitted(val_logits, val_features, val_spectra)  # (V,)
    fitted.threshold = keep_threshold(val_scores, keep_rate)
    fitted.val_unknown_fraction = float(fitted.flags(val_scores).mean())
    return fitted


# ---------------------------------------------------------------------------------------
# In the model directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_unknown_tensors(model_dir: str | Path, fitted: UnknownScore) -> dict[str, Any]:
    """Write ``model_dir/unknown.safetensors`` (atomically, when the score has tensors) and
    return the card's ``"unknown"`` entry, which names the file and its sha256."""
    if not fitted.tensors:
        return fitted.record()
    path = Path(model_dir) / TENSORS
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in fitted.tensors.items()}, str(tmp))
    return fitted.record(_sha256(path))


def load_unknown(model_dir: str | Path, entry: dict[str, Any] | None) -> UnknownScore | None:
    """The fitted score from a card's ``"unknown"`` entry (None: the model has none) and its
    tensors file, checked against the sha256 the card records."""
    if entry is None:
        return None
    where = Path(model_dir) / "config.json"
    try:
        fitted = UnknownScore(
            score=str(entry["score"]), threshold=float(entry["threshold"]), keep_rate=float(entry["keep_rate"]),
            val_unknown_fraction=float(entry["val_unknown_fraction"]), temperature=float(entry.get("temperature", 1.0)),
            knn_k=int(entry.get("knn_k", 1)), n_val=int(entry.get("n_val", 0)),
            scales=tuple(float(s) for s in entry.get("scales", (1.0, 1.0))),
            bands=int(entry.get("bands", LEGACY_SPECTRUM["bands"])), combine=str(entry.get("combine", LEGACY_SPECTRUM["combine"])),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UnknownScoreError(f"{where}: its 'unknown' entry is incomplete ({err!r}); {REDO}") from None
    if fitted.score not in OOD_SCORES:
        raise UnknownScoreError(f"{where}: unknown score {fitted.score!r} (this version knows {', '.join(OOD_SCORES)}); {REDO}")
    if fitted.combine not in COMBINE:
        raise UnknownScoreError(f"{where}: its 'unknown' entry combines by {fitted.combine!r} (allowed {', '.join(COMBINE)}); {REDO}")
    if fitted.score in FEATURE_SCORES:
        path = Path(model_dir) / TENSORS
        if not path.is_file():
            raise UnknownScoreError(f"{path}: missing (the {fitted.score} score's statistics); {REDO}")
        expected = (entry.get("tensors") or {}).get("sha256")
        if expected and _sha256(path) != expected:
            raise UnknownScoreError(f"{path}: its sha256 differs from the one config.json records (damaged or from "
                                    f"another model); {REDO}")
        fitted.tensors = load_file(str(path))
    return fitted


# ---------------------------------------------------------------------------------------
# Drift: a batch far more unknown than val


@dataclass(frozen=True)
class Drift:
    n: int                  # images scored in the batch
    unknown: int            # of them called unknown
    expected_fraction: float  # the val unknown fraction
    p_value: float          # P(X >= unknown), X ~ Binomial(n, expected_fraction)
    alarm: bool             # p_value < the test level

    @property
    def fraction(self) -> float:
        return self.unknown / self.n if self.n else 0.0


def drift_test(n: int, unknown: int, val_unknown_fraction: float, n_val: int, level: float) -> Drift:
    """One-sided binomial test of ``unknown`` of ``n`` against the val fraction. The val fraction
    is floored at 1 / (n_val + 1) (val of n_val images cannot show a rate below it)."""
    p0 = min(max(val_unknown_fraction, 1.0 / (max(n_val, 0) + 1)), 1.0)
    p_value = float(binom.sf(unknown - 1, n, p0)) if n > 0 and unknown > 0 else 1.0
    return Drift(n, unknown, val_unknown_fraction, p_value, p_value < level)
