"""Turn an 8-bit grey micrograph into the square grey image models see.

``load_micrograph`` is the exact preprocessing of the ``prepare`` stage, used again at
prediction time: decode (``multifusion.data.decode``) -> crop the burnt-in info bar ->
centre crop or pad to a square (``data.aspect``) -> resize to ``data.image_size`` ->
grey levels standardized (``data.grey_levels``). A micrograph too small for that raises :class:`~multifusion.data.decode.ImageError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from multifusion.core.config import DataConfig
from multifusion.data.decode import ImageError, decode_image, grey_pixels
from multifusion.data.grey_levels import apply_grey_levels
from multifusion.data.infobar import bar_search_start, bar_top
from multifusion.data.resample import resize


def square_box(image: Image.Image, rows: int, aspect: str) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The square of the top ``rows`` of ``image`` (the micrograph above its bar) that
    models see, as (image, box (left, top, right, bottom) in it). aspect='crop': the
    largest centred square, a box in ``image`` itself (no copy); aspect='pad': the top
    rows padded with their median grey to a square, the whole of a new image."""
    w = image.width
    if aspect == "crop":
        side = min(rows, w)
        left, top = (w - side) // 2, (rows - side) // 2
        return image, (left, top, left + side, top + side)
    micrograph = grey_pixels(image)[:rows]  # (rows, W)
    side = max(rows, w)
    square = np.full((side, side), np.median(micrograph), dtype=np.uint8)
    top, left = (side - rows) // 2, (side - w) // 2
    square[top:top + rows, left:left + w] = micrograph
    return Image.fromarray(square), (0, 0, side, side)


class Preprocessed(NamedTuple):
    image: np.ndarray  # uint8 (S, S): what models see
    reduced: np.ndarray  # uint8 (>= 3S, >= 3S): the box-averaged square, for hashing
    bar_rows: int  # rows of info bar cropped from the bottom


def preprocess(image: Image.Image, data: DataConfig, name: str = "image") -> Preprocessed:
    """8-bit grey PIL image -> info bar cropped, squared, resized to data.image_size, grey
    levels as data.grey_levels says (the hashing square ``reduced`` keeps the raw levels).

    Resizing is an integer box reduction of the square (Pillow's ``reduce`` on the box,
    without copying the image) to at least 3x the size, then antialiased Lanczos-3 as two
    small matrix products (``resample.resize``; Pillow's weights). Raises ImageError
    (naming ``name``) when the micrograph without its bar is smaller than
    data.image_size: models never see upsampled micrographs."""
    w, h = image.size
    rows = h
    if data.infobar == "auto":  # the bar search reads the bottom rows only, in place
        start = bar_search_start(h)
        rows = start + bar_top(grey_pixels(image)[start:])
    if min(rows, w) < data.image_size:
        raise ImageError(f"{name}: {w}x{rows} after cropping the info bar is smaller than data.image_size="
                         f"{data.image_size}; use the full-size original or lower data.image_size")
    source, box = square_box(image, rows, data.aspect)
    factor = (box[2] - box[0]) // (3 * data.image_size)
    reduced = grey_pixels(source.reduce(factor, box=box) if factor > 1 else source.crop(box))  # (R, R)
    resized = resize(reduced, (data.image_size, data.image_size), "lanczos")  # (S, S)
    return Preprocessed(apply_grey_levels(resized, data.grey_levels), reduced, h - rows)


def load_micrograph(path: str | Path, data: DataConfig) -> np.ndarray:
    """The file at ``path`` as ``prepare`` stores it: uint8 (S, S), S = data.image_size."""
    return preprocess(decode_image(path, data.max_pixels), data, str(path)).image
