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
BLOCK = 96  # rows of strip shares computed at a time, from the bottom up


def strip_level(grey: np.ndarray) -> int:
    """The most common grey level of the bottom 3 rows: the strip's colour if there is one."""
    counts = np.bincount(grey[-3:].ravel(), minlength=256)
    # Smooth the histogram by +-2 levels so JPEG jitter around a flat colour still peaks.
    smooth = np.convolve(counts, np.ones(5), mode="same")
    return int(np.argmax(smooth))


def row_strip_share(grey: np.ndarray, level: int) -> np.ndarray:
    """Per row, the share of pixels within LEVEL_TOL of ``level``: (H,) float."""
    lo, hi = max(0, level - LEVEL_TOL), min(255, level + LEVEL_TOL)
    # One subtract and one compare: uint8 wrap-around sends levels below lo above hi - lo.
    near = (grey - np.uint8(lo)) <= np.uint8(hi - lo)  # (H, W) bool
    return near.view(np.uint8).sum(axis=1, dtype=np.uint32) / grey.shape[1]


def bar_search_start(height: int) -> int:
    """First row of the bottom MAX_FRACTION of an image ``height`` rows tall: a bar lies below it."""
    return height - int(height * MAX_FRACTION)


def find_info_bar(grey: np.ndarray) -> int:
    """Index of the first row of the bottom info bar of grey uint8 (H, W), or H when there is none."""
    start = bar_search_start(grey.shape[0])
    return start + bar_top(grey[start:])


def bar_top(region: np.ndarray) -> int:
    """Index in ``region`` (uint8 (R, W), the bottom rows of a micrograph) of the bar's first
    row, or R when there is none.

    The bar's top is the highest row that is (a) flat at the strip colour, (b) a sharp
    step up from the rows above it, and (c) above only bar rows (each at least TEXT_ROW
    strip-coloured) down to the bottom edge. The one or two rows that resizing blended
    between micrograph and bar are cropped with it.
    """
    # Shares bottom-up, BLOCK rows at a time: every bar row is at least TEXT_ROW strip-
    # coloured, so no candidate lies above the lowest row under TEXT_ROW, and the search
    # stops once 6 rows above that one (what ``above`` reads) are known. Same answer as
    # all rows at once; on a typical bar, one block.
    height, level = len(region), strip_level(region)
    start, share, under = height, np.zeros(0), np.zeros(0, np.int64)
    while start > 0:
        end, start = start, max(0, start - BLOCK)
        share = np.concatenate([row_strip_share(region[start:end], level), share])  # (R',) rows start..
        if share[-1] < 0.5:
            return height
        under = np.flatnonzero(share < TEXT_ROW)
        if len(under) and under[-1] >= 6:
            break
    first = max(6, under[-1] + 1 if len(under) else 0)  # from row first down, only bar-ish rows
    last = len(share) - MIN_ROWS + 1  # ... and have MIN_ROWS bar rows to the bottom
    if first >= last:
        return height
    csum = np.concatenate([[0.0], np.cumsum(share)])  # csum[i] = share[:i].sum()
    rows = np.arange(first, last)  # (C,) candidate rows
    above = (csum[rows - 1] - csum[rows - 6]) / 5  # (C,) mean share of rows r-6 .. r-2
    flat = share[first:last]
    hits = np.flatnonzero((flat >= FLAT_ROW) & (flat - above >= STEP))
    if not len(hits):
        return height
    top = first + int(hits[0])
    # Up to 2 rows blended between content and bar by resampling: their mean grey lies
    # more than a third of the way from the content's towards the strip's colour.
    means = (region[start + top - 6:start + top + 1].sum(axis=1, dtype=np.int64) / region.shape[1]).tolist()
    content, strip = sum(means[:4]) / 4, means[6]  # rows top-6 .. top-3; the bar's top row
    for step in range(2):
        if (means[5 - step] - content) / (strip - content + 1e-6) > 1 / 3:
            top -= 1
    return start + top
