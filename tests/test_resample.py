"""resample.resize and the pHash's folded box average against Pillow and scipy."""

import numpy as np
import pytest
import scipy.fft
from PIL import Image

from multifusion.data.resample import filter_matrix, resize
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
        # Pillow in float ('F') resamples with the same weights and no intermediate rounding.
        reference = np.asarray(Image.fromarray(image.astype(np.float32)).resize(out_shape[::-1], pil))
        weights_r, weights_c = filter_matrix(in_shape[0], out_shape[0], kernel), filter_matrix(in_shape[1], out_shape[1], kernel)
        exact = weights_r.astype(np.float64) @ image @ weights_c.T.astype(np.float64)
        np.testing.assert_allclose(exact, reference, atol=2e-3)
        # The uint8 result is that, rounded and clipped (float32 may round a tie x.5 the
        # other way); Pillow's own uint8 path rounds between its passes too, so it is at
        # most 1 level away on smooth images.
        expected = np.clip(np.rint(exact), 0, 255)
        differ = resize(image, out_shape, kernel) != expected
        assert np.all(np.abs(np.abs(exact - np.floor(exact)) - 0.5)[differ] < 1e-3)
        smooth = smooth_image(rng, in_shape)
        pillow_uint8 = np.asarray(Image.fromarray(smooth).resize(out_shape[::-1], pil)).astype(int)
        assert np.abs(resize(smooth, out_shape, kernel).astype(int) - pillow_uint8).max() <= 1


def test_filter_rows_sum_to_one_and_are_cached():
    weights = filter_matrix(768, 64, "lanczos")
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert filter_matrix(768, 64, "lanczos") is weights and not weights.flags.writeable


def test_perceptual_hash_is_the_dct_of_the_box_average():
    rng = np.random.default_rng(0)
    for shape in ((192, 192), (96, 128), (32, 32)):
        image = smooth_image(rng, shape)
        small = np.asarray(Image.fromarray(image.astype(np.float32)).resize((32, 32), Image.Resampling.BOX), np.float64)
        low = scipy.fft.dctn(small, norm="ortho")[:8, :8].ravel()
        bits = low > np.median(low[1:])
        assert perceptual_hash(image) == int(np.packbits(bits).view(">u8")[0])
