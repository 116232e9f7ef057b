"""The screening forward pass: logits under the test-time view policy, and the penultimate
features the unknown-material score reads.

    out = screen_outputs(model, images_u8, batch_size=64, device="cpu", temperature=T,
                         tta=True, views=ViewPolicy(first=2, confidence=0.9))
    out.logits (N, K)  out.features (N, D)  out.spectra (N, B)  out.views (N,)

Policy (:class:`ViewPolicy`, params ``predict.first_views`` / ``predict.view_confidence``):
without ``tta`` the identity view alone. With ``tta`` every image first takes the first
``first`` views of :data:`VIEW_ORDER` (identity, 180-degree turn, ...) in one batch; where
their averaged logits' calibrated top-1 probability (softmax(logits / T)) is at or below
``confidence``, the remaining views are added and the logits averaged over all eight
(adaptive views; ``ViewPolicy()`` = all eight everywhere, the full policy ``evaluate``
scores with). The features always come from the identity view, so the unknown score means
the same whatever views the logits took; the texture profiles
(:mod:`multifusion.evaluation.spectrum`, the same for every view) come from the images
themselves.

Precision (``predict.precision``): ``auto`` runs the forward pass under bf16 autocast where
the device computes bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX), fp32 elsewhere. On
NCM (3 seeds) bf16 with two views first called as many test images right as fp32 with all
eight (2 lost, 2 gained of 879) at 1.3-1.4x predict's images/s on 2 cores
(bench/results/predict_precision_ncm_2026-12-08.txt); ``fp32`` gives the same numbers on
every machine.

Why two views first by default: on NCM under standardized grey levels one view's confidence
is a poor gate (the identity view alone at 0.9 cost 0.025 test top-1 against the eight views,
3 seeds); the identity and its 180-degree turn at 0.9 cost 0.001 with 2.4 forward passes per
image (bench/results/adaptive_views_grey_levels_ncm_2026-12-07.txt).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from multifusion.core.config import PRECISIONS, PredictConfig
from multifusion.data.dataset import to_model_input
from multifusion.evaluation.evaluate import dihedral_views
from multifusion.evaluation.spectrum import BANDS, radial_log_spectrum


# indices into dihedral_views, in the order the policy adds them: identity, 180, 90 and 270 degrees, then the mirrored four
VIEW_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)


@dataclass(frozen=True)
class ViewPolicy:
    """How the screening forward pass runs. Test-time views under ``evaluate.tta``: every
    image takes the first ``first`` views of :data:`VIEW_ORDER`; where their mean's calibrated
    top-1 probability is at or below ``confidence``, all eight. ``precision``: fp32, bf16
    autocast, or auto (bf16 where the device computes it natively: see :meth:`bf16_on`). The
    default is all eight views on every image, in fp32."""

    first: int = 8
    confidence: float = 1.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not 1 <= self.first <= 8:
            raise ValueError(f"predict.first_views must be 1 to 8 (8 = all eight views), got {self.first}")
        if not 0.0 < self.confidence <= 1.0:
            raise ValueError(f"predict.view_confidence must be in (0, 1] (1 = all eight views), got {self.confidence}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"predict.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def of(cls, predict: PredictConfig) -> ViewPolicy:
        """The policy of params.yaml's ``predict`` section."""
        return cls(predict.first_views, predict.view_confidence, predict.precision)

    def bf16_on(self, device: torch.device) -> bool:
        """Whether the forward pass runs under bf16 autocast on ``device``: auto = on CUDA and on
        a CPU with AVX512-BF16 or AMX (where bf16 matrix products are native: predict screens
        1.3-1.4x the images/s of fp32 on this project's 2-core AMD EPYC); an AVX2-only CPU
        emulates bf16, slower than fp32."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())


def native_cpu_bf16() -> bool:
    """This CPU computes bf16 matrix products natively (AVX512-BF16 or AMX tiles). The probes
    are private torch helpers (torch 2.x); without them: False (fp32, always correct)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


@dataclass
class ScreenOutputs:
    logits: np.ndarray      # (N, K) float32, averaged over the views each image took
    features: np.ndarray    # (N, D) float32, the identity view's penultimate features
    spectra: np.ndarray     # (N, B) float64, each image's texture profile (the knn_spectrum unknown score reads it)
    views: np.ndarray       # (N,) int, views averaged (ViewPolicy.first, or 8)


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, 1, S, S) -> (logits (B, K), penultimate features (B, D)) from one forward pass.

    timm's pattern: ``forward_features`` then ``forward_head``. For MultiFusion the features
    are the visual tokens (B, L(+1), C) flattened, what its visual classifier reads; for a
    baseline, ``forward_head(..., pre_logits=True)`` (its pooled features). A module without
    ``forward_features`` (a plain classifier) hands its logits as the features."""
    if not hasattr(model, "forward_features"):
        logits = model(x)  # (B, K)
        return logits, logits
    feats = model.forward_features(x)
    logits = model.forward_head(feats)  # (B, K)
    if "pre_logits" in inspect.signature(model.forward_head).parameters:
        return logits, model.forward_head(feats, pre_logits=True)  # baselines: (B, D)
    return logits, feats.flatten(1)  # MultiFusion: the visual tokens its classifier reads (B, L*C)


@torch.no_grad()
def screen_outputs(
    model: nn.Module,
    images_u8: np.ndarray,
    batch_size: int,
    device: str | torch.device,
    temperature: float,
    tta: bool,
    views: ViewPolicy = ViewPolicy(),
    spectrum_bands: int = BANDS,
) -> ScreenOutputs:
    """uint8 images (N, S, S) -> logits under the view policy, identity-view features, texture
    profiles of ``spectrum_bands`` bands (a fitted knn_spectrum score's ``bands``), views used."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    first = views.first if tta else 1
    bf16 = views.bf16_on(device)
    logit_chunks, feature_chunks, spectrum_chunks, view_chunks = [], [], [], []
    for start in range(0, len(images_u8), batch_size):
        batch_u8 = np.asarray(images_u8[start : start + batch_size])  # (B, S, S)
        spectrum_chunks.append(radial_log_spectrum(batch_u8, spectrum_bands))  # (B, bands)
        x = to_model_input(batch_u8).to(device)  # (B, 1, S, S)
        every_view = dihedral_views(x) if tta else [x]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            opening = torch.cat([every_view[i] for i in VIEW_ORDER[:first]])  # the first views, one batch (first*B, 1, S, S)
            logits, feats = logits_and_features(model, opening)  # (first*B, K), (first*B, D)
            feats = feats[: len(x)]  # the identity view's (B, D)
            summed = logits.float().view(first, len(x), -1).sum(dim=0)  # (B, K)
            taken = torch.full((len(x),), first, dtype=torch.long)
            if tta and first < 8:
                top1 = torch.softmax(summed / first / temperature, dim=1).max(dim=1).values  # (B,)
                more = torch.nonzero(top1 <= views.confidence).flatten()  # images not yet certain
                if len(more):
                    rest = torch.cat([every_view[i][more] for i in VIEW_ORDER[first:]])  # the other views, one batch:
                    # 1.2x faster than several small batches on CPU (b = 10, 1 thread)
                    summed[more] += model(rest).float().view(8 - first, len(more), -1).sum(dim=0)  # (b, K)
                    taken[more.cpu()] = 8
        logit_chunks.append((summed / taken.to(summed.device)[:, None]).cpu())
        feature_chunks.append(feats.float().cpu())
        view_chunks.append(taken)
    model.train(was_training)
    if not logit_chunks:
        raise ValueError("screen_outputs: no images given")
    return ScreenOutputs(torch.cat(logit_chunks).numpy(), torch.cat(feature_chunks).numpy(), torch.cat(spectrum_chunks).numpy(),
                         torch.cat(view_chunks).numpy())
