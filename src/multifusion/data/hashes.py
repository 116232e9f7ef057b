"""Fingerprints of a micrograph: exact (pixels, stored image) and perceptual.

- ``pixel_hash``: xxh3-128 of the decoded grey pixels and their size: equal exactly for
  pixel-identical files in any format (exact duplicates);
- ``image_sha256``: sha256 of the prepared (S, S) image, what models see (the manifest's
  ``sha256``);
- ``perceptual_hash``: a 64-bit pHash, close (a few bits) for near-copies: re-shots,
  fresh noise, small shifts (near-duplicate grouping in ``split``).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import xxhash
from PIL import Image

from multifusion.data.decode import pixel_buffer
from multifusion.data.resample import filter_matrix


def pixel_hash(image: Image.Image) -> str:
    """128-bit xxh3 of a grey image's size and pixels: equal exactly for pixel-identical
    images (collisions ~2^-64 among 2^32 files), ~30x faster than sha256 on 1024x768."""
    digest = xxhash.xxh3_128(np.asarray(image.size, np.int64).tobytes())
    digest.update(pixel_buffer(image))
    return digest.hexdigest()


def image_sha256(image: np.ndarray) -> str:
    """sha256 of a C-contiguous uint8 (S, S) image's bytes, hex."""
    return hashlib.sha256(image.data).hexdigest()


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n``: (k, n)."""
    freq, pos = np.arange(k)[:, None], np.arange(n)[None, :]
    rows = np.cos(np.pi * (2 * pos + 1) * freq / (2 * n)) * np.sqrt(2.0 / n)
    rows[0] /= np.sqrt(2.0)
    return rows


DCT_8x32 = _dct_rows(32, 8)  # (8, 32)


@lru_cache(maxsize=16)
def _hash_projection(in_size: int) -> np.ndarray:
    """(8, in_size) float64: Pillow's box average to 32 samples, then the 8 lowest DCT rows
    (float64 so that a BLAS's summation order, which depends on the CPU, cannot move a bit)."""
    return DCT_8x32 @ filter_matrix(in_size, 32, "box")


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit pHash of a grey image (H, W): signs of the 8x8 lowest DCT frequencies of its
    32x32 box average against their median (DC excluded). Robust to noise, contrast and
    small shifts. Equals ``scipy.fft.dctn(small, norm="ortho")[:8, :8]`` thresholded,
    ``small`` the 32x32 box average, with the average folded into the DCT matrices."""
    rows, cols = _hash_projection(image.shape[0]), _hash_projection(image.shape[1])  # (8, H), (8, W)
    low = (rows @ image.astype(np.float64) @ cols.T).ravel()  # (64,)
    bits = low > np.partition(low[1:], 31)[31]  # the median of the 63 AC terms
    return int(np.packbits(bits).view(">u8")[0])
