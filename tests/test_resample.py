"""resample.resize and the pHash's folded box average against Pillow and scipy."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
from PIL import Image

from multifusion.data.resample import WEIGHT_BITS, filter_matrix, resize
from multifusion.data.hashes import perceptual_hash


def smooth_image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random uint8 (H, W) texture in 20..235: no resampling overshoot reaches 0 or 255."""
    coarse = rng.integers(20, 236, (max(2, shape[0] // 6), max(2, shape[1] // 6)), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.Resampling.BILINEAR))


@pytest.mark.parametrize("kernel, pil", [("lanczos", Image.Resampling.LANCZOS), ("box", Image.Resampling.BOX)])
@pytest.mark.parametrize("in_shape, out_shape", [((192, 192), (64, 64)), ((240, 320), (64, 48)),
                                                 ((100, 150), (37, 23)), ((50, 50), (80, 70)), ((64, 64), (64, 64))])
def test_resize_matches_pillow(kernel, pil, in_shape, out_shape):
    rng = np.random.default_rng(sum(in_shape) + sum(out_shape))
    for _ in range(3):
        image = rng.integers(0, 256, in_shape, dtype=np.uint8)
        # Pillow in float ('F') resamples with its float weights and no intermediate rounding; ours are
        # those weights to the nearest 2**-16.
        reference = np.asarray(Image.fromarray(image.astype(np.float32)).resize(out_shape[::-1], pil))
        weights_r, weights_c = filter_matrix(in_shape[0], out_shape[0], kernel), filter_matrix(in_shape[1], out_shape[1], kernel)
        np.testing.assert_allclose(weights_r @ image @ weights_c.T, reference, atol=0.02)
        # The uint8 result is the exact product, rounded and clipped: integer arithmetic in the
        # weights' units (2**-16) gives it without any float rounding.
        units_r, units_c = (np.rint(w * 2**WEIGHT_BITS).astype(np.int64) for w in (weights_r, weights_c))
        numerator = units_r @ image.astype(np.int64) @ units_c.T  # exact, below 2**49
        expected = np.clip(np.rint(numerator / 2.0 ** (2 * WEIGHT_BITS)), 0, 255)
        np.testing.assert_array_equal(resize(image, out_shape, kernel), expected)
        # Pillow's own uint8 path rounds between its passes, so it is at most 1 level away on smooth images.
        smooth = smooth_image(rng, in_shape)
        pillow_uint8 = np.asarray(Image.fromarray(smooth).resize(out_shape[::-1], pil)).astype(int)
        assert np.abs(resize(smooth, out_shape, kernel).astype(int) - pillow_uint8).max() <= 1


def test_filter_rows_are_fixed_point_sum_to_one_and_are_cached():
    weights = filter_matrix(768, 64, "lanczos")
    units = weights * 2**WEIGHT_BITS
    np.testing.assert_array_equal(units, np.rint(units))  # multiples of 2**-WEIGHT_BITS
    np.testing.assert_array_equal(weights.sum(axis=1), 1.0)  # exactly
    assert filter_matrix(768, 64, "lanczos") is weights and not weights.flags.writeable


RESIZE_BYTES = """
import hashlib, sys
import numpy as np
from multifusion.data.resample import resize
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(192, 192), (233, 233), (384, 512)] * 20]
sys.stdout.write(hashlib.sha256(b"".join(resize(im, (64, 64)).tobytes() for im in images)).hexdigest())
"""


@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True,
                    reason="OpenBLAS's SkylakeX kernels need a CPU with AVX-512")
def test_resize_is_the_same_under_every_blas_kernel():
    """The regression: in float32, OpenBLAS's Haswell and SkylakeX kernels summed in other orders
    and gave another data/prepared from the same files (dvc.lock changed with the machine)."""
    outputs = {coretype: subprocess.run([sys.executable, "-c", RESIZE_BYTES], capture_output=True, text=True, check=True,
                                        env={**os.environ, "OPENBLAS_CORETYPE": coretype, "OMP_NUM_THREADS": "1"}).stdout
               for coretype in ("Haswell", "SkylakeX")}
    assert outputs["Haswell"] == outputs["SkylakeX"]


def test_perceptual_hash_is_the_dct_of_the_box_average():
    rng = np.random.default_rng(0)
    for shape in ((192, 192), (96, 128), (32, 32)):
        image = smooth_image(rng, shape)
        small = np.asarray(Image.fromarray(image.astype(np.float32)).resize((32, 32), Image.Resampling.BOX), np.float64)
        low = scipy.fft.dctn(small, norm="ortho")[:8, :8].ravel()
        bits = low > np.median(low[1:])
        assert perceptual_hash(image) == int(np.packbits(bits).view(">u8")[0])
