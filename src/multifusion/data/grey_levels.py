"""The grey-level policy of the model's input (``data.grey_levels``, the card's ``input.grey_levels``).

``standardize`` gives every image one mean and spread of grey levels, so the microscope's
brightness and contrast settings are no evidence and no risk; ``raw`` keeps the levels as
recorded. ``prepare`` and ``predict`` apply it after resizing (``multifusion.data.preprocess``),
the robustness shifts after shifting (a micrograph taken at the shifted setting).
"""

from __future__ import annotations

import numpy as np

# data.grey_levels=standardize: every image's grey levels to this mean and standard deviation. 48 grey
# levels keeps +-2.65 standard deviations inside 0-255, so clipping touches only the outliers.
GREY_MEAN, GREY_STD = 128.0, 48.0


def standardize_grey_levels(images: np.ndarray) -> np.ndarray:
    """uint8 (..., S, S) -> uint8 (..., S, S): each image's grey levels shifted and scaled to
    mean ``GREY_MEAN`` and standard deviation ``GREY_STD``, rounded and clipped to 0-255 (a flat
    image becomes flat ``GREY_MEAN``). The microscope's brightness and contrast settings then no
    longer show; texture and relative contrast do.

    The mean and spread come from exact integer sums (one rounding each), not from a float
    reduction whose order a CPU's vector width picks: the same pixels on every machine."""
    pixels = np.asarray(images, dtype=np.int64)
    n = pixels.shape[-2] * pixels.shape[-1]
    total = pixels.sum(axis=(-2, -1), keepdims=True)  # (..., 1, 1), exact
    squares = (pixels * pixels).sum(axis=(-2, -1), keepdims=True)  # (..., 1, 1), exact
    mean = total / n
    std = np.sqrt((squares * n - total * total).astype(np.float64)) / n  # n * variance * n, an exact integer
    scaled = (pixels - mean) / np.where(std > 0, std, 1.0) * GREY_STD + GREY_MEAN
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def apply_grey_levels(images: np.ndarray, grey_levels: str) -> np.ndarray:
    """The ``data.grey_levels`` policy on uint8 (..., S, S): ``standardize`` or ``raw`` (as is)."""
    return standardize_grey_levels(images) if grey_levels == "standardize" else images
