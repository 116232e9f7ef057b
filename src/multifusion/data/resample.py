"""Image resampling as two small matrix products: ``out = R @ image @ C.T``.

A separable resampling filter is linear in the image: each output row is a weighted sum
of input rows, each output column of input columns. ``filter_matrix`` builds those
weights exactly as Pillow's ``ImagingResample`` does (antialiased: the kernel is widened
by the downscale factor; the taps between ``xmin`` and ``xmax`` of each output pixel,
normalised to sum to 1), so

    resize(image, (64, 64), "lanczos")  ~=  Image.fromarray(image).resize((64, 64), Image.LANCZOS)

up to rounding (Pillow rounds to uint8 between its horizontal and vertical pass; here the
product stays in float until the end). On the box-reduced squares ``prepare`` resizes
(~3x the output side) the two BLAS products take a few tens of microseconds, against a
few hundred for Pillow's fixed-point loops, and the same matrices compose with others:
``split.perceptual_hash`` folds its 32x32 box average into its DCT this way.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Lanczos-3 window: sinc(x) sinc(x/3) on [-3, 3)."""
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    """Box window on (-0.5, 0.5]."""
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


KERNELS = {"lanczos": (_lanczos, 3.0), "box": (_box, 0.5)}  # name -> (window, support)


@lru_cache(maxsize=32)
def filter_matrix(in_size: int, out_size: int, kernel: str) -> np.ndarray:
    """Resampling weights from ``in_size`` to ``out_size`` samples: float32 (out, in), rows sum to 1.

    Pillow's ``precompute_coeffs``: output pixel ``i`` is centred at input coordinate
    ``(i + 0.5) * scale``; for a downscale the window is stretched by ``scale``; the
    taps are the input pixels ``[xmin, xmax)`` around the centre. Cached: read-only."""
    window, support = KERNELS[kernel]
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = support * stretch
    centres = (np.arange(out_size) + 0.5) * scale  # (out,)
    xmin = np.maximum((centres - support + 0.5).astype(np.int64), 0)  # C's (int) truncates too
    xmax = np.minimum((centres + support + 0.5).astype(np.int64), in_size)
    x = np.arange(in_size)  # (in,)
    weights = window((x[None, :] - centres[:, None] + 0.5) / stretch)  # (out, in)
    weights[(x[None, :] < xmin[:, None]) | (x[None, :] >= xmax[:, None])] = 0.0
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.flags.writeable = False
    return weights


def resize(image: np.ndarray, size: tuple[int, int], kernel: str = "lanczos") -> np.ndarray:
    """uint8 (H, W) -> uint8 (h, w) for ``size = (h, w)``, antialiased by ``kernel``."""
    rows = filter_matrix(image.shape[0], size[0], kernel)  # (h, H)
    cols = filter_matrix(image.shape[1], size[1], kernel)  # (w, W)
    out = rows @ image.astype(np.float32) @ cols.T  # (h, W) then (h, w)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
