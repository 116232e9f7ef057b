"""Detect the instrument info bar burnt into the bottom rows of a micrograph.

SEM software writes a strip of one flat colour (black, white, or any grey) across the
full width at the bottom, with text and a scale bar on it. Per row, the share of pixels
at the strip's colour is high inside the strip (text covers a minority of a row) and
low in the micrograph above it; the strip's top edge is a sharp, straight step across
the whole width. A dark or bright region of the specimen has neither property, so an
image without a bar is left whole.

    top = find_info_bar(grey)   # grey: uint8 (H, W); rows [top, H) are the bar
    content = grey[:top]
"""

from __future__ import annotations

import numpy as np

MAX_FRACTION = 0.35  # a bar never covers more of the image than this
MIN_ROWS = 4  # thinner strips are not bars (nor worth cropping)
LEVEL_TOL = 5  # grey levels around the strip's colour that count as "strip"
FLAT_ROW = 0.9  # the bar's top row (its border) is at least this strip-coloured
STEP = 0.4  # ... and this much more than the rows of micrograph just above it
TEXT_ROW = 0.15  # no row of the bar is less strip-coloured than this (text is sparse)


def strip_level(grey: np.ndarray) -> int:
    """The most common grey level of the bottom 3 rows: the strip's colour if there is one."""
    counts = np.bincount(grey[-3:].ravel(), minlength=256)
    # Smooth the histogram by +-2 levels so JPEG jitter around a flat colour still peaks.
    smooth = np.convolve(counts, np.ones(5), mode="same")
    return int(np.argmax(smooth))


def row_strip_share(grey: np.ndarray, level: int) -> np.ndarray:
    """Per row, the share of pixels within LEVEL_TOL of ``level``: (H,) float."""
    lo, hi = np.uint8(max(0, level - LEVEL_TOL)), np.uint8(min(255, level + LEVEL_TOL))
    return np.count_nonzero((grey >= lo) & (grey <= hi), axis=1) / grey.shape[1]


def find_info_bar(grey: np.ndarray) -> int:
    """Index of the first row of the bottom info bar, or H when there is none.

    grey: uint8 (H, W). The bar's top is the highest row that is (a) flat at the strip
    colour, (b) a sharp step up from the rows above it, and (c) above only bar rows (each
    at least TEXT_ROW strip-coloured) down to the bottom edge. The one or two rows that
    resizing blended between micrograph and bar are cropped with it.
    """
    h = grey.shape[0]
    lowest = h - int(h * MAX_FRACTION)  # search the bottom MAX_FRACTION of rows only
    region = grey[lowest:]
    share = row_strip_share(region, strip_level(region))  # (R,)
    if share[-1] < 0.5:
        return h
    bar_below = np.minimum.accumulate(share[::-1])[::-1] >= TEXT_ROW  # (R,) rows r..R-1 all bar-ish
    csum = np.concatenate([[0.0], np.cumsum(share)])
    above = np.full_like(share, np.inf)
    above[6:] = (csum[5:-2] - csum[:-7]) / 5  # (R,) mean share of rows r-6 .. r-2
    candidates = (share >= FLAT_ROW) & bar_below & (share - above >= STEP)
    candidates[len(share) - MIN_ROWS + 1:] = False
    if not candidates.any():
        return h
    top = int(np.argmax(candidates))
    # Up to 2 rows blended between content and bar by resampling: their mean grey lies
    # more than a third of the way from the content's towards the strip's colour.
    means = region[top - 6:top + 1].mean(axis=1)  # (7,) rows top-6 .. top
    content, level = means[:4].mean(), means[6]
    for step in range(2):
        if (means[5 - step] - content) / (level - content + 1e-6) > 1 / 3:
            top -= 1
    return lowest + top
