"""Image resampling as two small banded matrix products: ``out = R @ image @ C.T``.

A separable resampling filter is linear in the image: each output row is a weighted sum
of input rows, each output column of input columns. ``filter_matrix`` builds those
weights exactly as Pillow's ``ImagingResample`` does (antialiased: the kernel is widened
by the downscale factor; the taps between ``xmin`` and ``xmax`` of each output pixel,
normalised to sum to 1), so

    resize(image, (64, 64), "lanczos")  ~=  Image.fromarray(image).resize((64, 64), Image.LANCZOS)

up to rounding (Pillow rounds to uint8 between its horizontal and vertical pass; here the
product stays exact until the end). On the box-reduced squares ``prepare`` resizes
(~3x the output side) the two banded BLAS products take a fifth of the time of
Pillow's fixed-point loops (233 -> 64: 60 us against 287 us, one thread, measured), and
the matrices compose with others: ``hashes.perceptual_hash`` folds its 32x32 box average
into its DCT.

The result is the same on every CPU. A BLAS sums a product in the order its kernel for that
CPU chooses, and in float32 the order moves the last bit: the same raw files gave two
different ``data/prepared`` under OpenBLAS's Haswell and SkylakeX kernels (a pixel here and
there rounded to the other grey level), so ``dvc.lock`` changed with the machine. So every
weight is a multiple of ``2**-WEIGHT_BITS`` (rows still summing to exactly 1) and the
products run in float64: every partial sum of uint8 pixels times such weights, over both
passes, is a multiple of ``2**-(2 * WEIGHT_BITS)`` below ``2**49``, which float64 holds
exactly, so any summation order (and any FMA) gives the same, exact, result.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Filter weights are rounded to multiples of 2**-WEIGHT_BITS (at most 2**-17 off Pillow's float weights: under
# 0.04 of a grey level on a 6:1 Lanczos resize): with uint8 pixels both passes' sums are then exact in float64.
WEIGHT_BITS = 16


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Lanczos-3 window: sinc(x) sinc(x/3) on [-3, 3)."""
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    """Box window on (-0.5, 0.5]."""
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


KERNELS = {"lanczos": (_lanczos, 3.0), "box": (_box, 0.5)}  # name -> (window, support)


@lru_cache(maxsize=32)
def filter_matrix(in_size: int, out_size: int, kernel: str) -> np.ndarray:
    """Resampling weights from ``in_size`` to ``out_size`` samples: float64 (out, in), each a
    multiple of ``2**-WEIGHT_BITS``, rows summing to exactly 1.

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
    weights = fixed_point(weights / weights.sum(axis=1, keepdims=True))
    weights.flags.writeable = False
    return weights


def fixed_point(weights: np.ndarray) -> np.ndarray:
    """float (out, in) rows summing to 1 -> the nearest multiples of ``2**-WEIGHT_BITS``, each
    row's rounding remainder added to its largest tap so that the row sums to exactly 1."""
    one = 2.0**WEIGHT_BITS
    units = np.rint(weights * one)  # (out, in) integers
    largest = np.abs(units).argmax(axis=1)  # (out,)
    units[np.arange(len(units)), largest] += one - units.sum(axis=1)
    return units / one


@lru_cache(maxsize=32)
def band_blocks(in_size: int, out_size: int, kernel: str, block: int = 16) -> tuple[tuple[int, int, int, int], ...]:
    """Blocks ``(start, stop, lo, hi)`` of ``filter_matrix(in_size, out_size, kernel)``:
    output samples start..stop-1 have weights only on input samples lo..hi-1 (each output
    reads ~2 x support x scale inputs, a band of the dense matrix)."""
    weights = filter_matrix(in_size, out_size, kernel)
    blocks = []
    for start in range(0, out_size, block):
        stop = min(out_size, start + block)
        taps = np.flatnonzero(weights[start:stop].any(axis=0))
        blocks.append((start, stop, int(taps[0]), int(taps[-1]) + 1))
    return tuple(blocks)


def resize(image: np.ndarray, size: tuple[int, int], kernel: str = "lanczos") -> np.ndarray:
    """uint8 (H, W) -> uint8 (h, w) for ``size = (h, w)``, antialiased by ``kernel``.

    ``rows @ image @ cols.T``, each product taken block by block over its band only (the
    taps outside it are zero): the same sums at a third of the dense cost for a 3:1 resize.
    Exact before the final rounding (see the module docstring): the same on every CPU."""
    (h, w), (H, W) = size, image.shape
    rows, cols = filter_matrix(H, h, kernel), filter_matrix(W, w, kernel)  # (h, H), (w, W)
    pixels = image.astype(np.float64)  # (H, W)
    vertical = np.empty((h, W), np.float64)
    for start, stop, lo, hi in band_blocks(H, h, kernel):
        vertical[start:stop] = rows[start:stop, lo:hi] @ pixels[lo:hi]  # (b, W)
    out = np.empty((h, w), np.float64)
    for start, stop, lo, hi in band_blocks(W, w, kernel):
        out[:, start:stop] = vertical[:, lo:hi] @ cols[start:stop, lo:hi].T  # (h, b)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
