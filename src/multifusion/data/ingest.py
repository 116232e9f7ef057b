"""Ingest the files of a data root: each file -> one :class:`Record` (the prepared image
and the fingerprints that de-duplication and grouping need, or why it was skipped).

Per file: decode (``decode``) -> preprocess (``preprocess``: info bar, square, resize) ->
hash (``hashes``: exact pixels, stored image, perceptual), on ``data.workers`` processes
(``parallel``). Finding the files is ``layout``'s job; de-duplicating, grouping and
splitting the records is ``prepare``'s and ``split``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np

from multifusion.core.config import DataConfig
from multifusion.data.decode import ImageError, decode_image
from multifusion.data.hashes import image_sha256, perceptual_hash, pixel_hash
from multifusion.data.parallel import parallel_map
from multifusion.data.preprocess import preprocess


@dataclass
class Record:
    """One decoded file: the prepared image and what splitting needs, or the error."""

    path: str
    image: np.ndarray | None = None  # uint8 (S, S)
    sha256: str = ""  # of the prepared image: what models see
    pixel_hash: str = ""  # xxh3-128 of the decoded grey pixels and their shape: exact duplicates
    phash: int = 0
    width: int = 0
    height: int = 0
    bar_rows: int = 0
    error: str = ""


def prepare_file(path: str, data: DataConfig) -> Record:
    """Decode and preprocess one file; never raises for a bad file (the error is kept)."""
    try:
        image = decode_image(path, data.max_pixels)
        exact = pixel_hash(image)  # first: it streams every page of the image in, in order
        out = preprocess(image, data, path)
    except (ImageError, OSError) as err:
        return Record(path=path, error=str(err).removeprefix(f"{path}: "))
    # The pHash of the box-reduced square (>= 3x image_size): its 32x32 average is nearly noise-free.
    return Record(path=path, image=out.image, sha256=image_sha256(out.image),
                  pixel_hash=exact, phash=perceptual_hash(out.reduced),
                  width=image.width, height=image.height, bar_rows=out.bar_rows)


def prepare_files(paths: list[str], data: DataConfig, progress: bool = True) -> Iterator[Record]:
    """``prepare_file`` over all paths on data.workers processes (0 = all cores), in order."""
    return parallel_map(partial(prepare_file, data=data), paths, data.workers, progress)
