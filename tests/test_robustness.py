"""Each distribution shift does what it says, checked against numpy/scipy/PIL references;
evaluate_under_shifts scores a model on every shift and severity."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from multifusion.core.config import RobustnessConfig
from multifusion.data.resample import resize
from multifusion.evaluation.shifts import (
    SHIFTS,
    brightness,
    contrast,
    defocus_blur,
    disk_kernel,
    gaussian_noise,
    info_bar,
    jpeg_quality,
    poisson_noise,
    rotation,
    zoom,
)


def textured(n: int = 6, size: int = 48, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size): smooth blobs + edges, values well inside [30, 225]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size))
    x = ndimage.gaussian_filter(x, sigma=(0, 2, 2))
    x = (x - x.mean()) / x.std()
    return np.clip(128 + 30 * x, 30, 225).astype(np.uint8)


def grey(n: int = 4, size: int = 64, level: int = 128) -> np.ndarray:
    return np.full((n, size, size), level, np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_every_shift_has_severities_in_params_and_keeps_shape(make_config, rng):
    cfg = make_config()
    list_fields = {f.name for f in dataclasses.fields(RobustnessConfig)} - {"seed", "batch_size"}
    assert set(SHIFTS) == list_fields
    images = textured()
    for name, fn in SHIFTS.items():
        for severity in getattr(cfg.robustness, name):
            out = fn(images, severity, np.random.default_rng(1))
            assert out.shape == images.shape and out.dtype == np.uint8, name
            again = fn(images, severity, np.random.default_rng(1))
            np.testing.assert_array_equal(out, again, err_msg=f"{name} not deterministic for a fixed rng")


def test_rotation_is_exact_np_rot90(rng):
    images = textured()
    np.testing.assert_array_equal(rotation(images, 90, rng), np.rot90(images, 1, axes=(1, 2)))
    np.testing.assert_array_equal(rotation(images, 180, rng), images[:, ::-1, ::-1])
    np.testing.assert_array_equal(rotation(rotation(images, 90, rng), 270, rng), images)
    with pytest.raises(ValueError, match="multiples of 90"):
        rotation(images, 45, rng)


def test_brightness_shifts_the_mean(rng):
    images = grey(level=100)
    assert brightness(images, 0.2, rng).mean() == pytest.approx(100 + 51, abs=0.5)
    assert brightness(images, -0.2, rng).mean() == pytest.approx(100 - 51, abs=0.5)
    assert brightness(grey(level=250), 0.3, rng).max() == 255  # clipped, not wrapped


def test_contrast_scales_deviation_and_keeps_mean(rng):
    images = textured()
    out = contrast(images, 0.5, rng)
    for a, b in zip(images.astype(float), out.astype(float)):
        assert b.mean() == pytest.approx(a.mean(), abs=0.6)
        assert b.std() == pytest.approx(0.5 * a.std(), rel=0.03)


def test_defocus_blur_matches_scipy_disk_convolution(rng):
    images = textured()
    out = defocus_blur(images, 2.0, rng)
    kernel = disk_kernel(2.0)
    assert kernel.shape == (5, 5) and kernel.sum() == pytest.approx(1.0)
    assert kernel[0, 0] == 0 and kernel[2, 0] > 0  # a disk, not a box
    # torch "reflect" padding == scipy "mirror" (edge pixel not repeated)
    reference = np.stack([ndimage.convolve(im.astype(np.float32), kernel, mode="mirror") for im in images])
    assert np.abs(out.astype(int) - np.rint(reference).astype(int)).max() <= 1
    assert abs(out.astype(float).mean() - images.astype(float).mean()) < 1.0  # mean preserved
    assert out.astype(float).var() < 0.8 * images.astype(float).var()  # detail removed
    assert defocus_blur(images, 3.0, rng).astype(float).var() < out.astype(float).var()


def test_gaussian_noise_std_matches_level(rng):
    images = grey()
    for std in (0.02, 0.05, 0.1):
        noise = gaussian_noise(images, std, rng).astype(float) - 128
        assert noise.mean() == pytest.approx(0, abs=0.2)
        assert noise.std() == pytest.approx(std * 255, rel=0.03)


def test_poisson_noise_is_shot_noise(rng):
    images = grey(level=128)
    for peak in (100.0, 10.0):
        out = poisson_noise(images, peak, rng).astype(float)
        assert out.mean() == pytest.approx(128, rel=0.02)
        # Var(255 * Poisson(x/255 * peak) / peak) = 255 * x / peak (plus rounding)
        assert out.var() == pytest.approx(255 * 128 / peak, rel=0.06)
    dark = poisson_noise(grey(level=10), 30.0, rng).astype(float)
    assert dark.var() < out.var()  # noise grows with signal, unlike additive noise


def test_jpeg_quality_changes_pixels_more_at_low_quality(rng):
    images = textured()
    err = {q: np.abs(jpeg_quality(images, q, rng).astype(int) - images).mean() for q in (90, 50, 10)}
    assert 0 < err[90] < err[50] < err[10]
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="JPEG", quality=50)
    np.testing.assert_array_equal(jpeg_quality(images, 50, rng)[0], np.asarray(Image.open(buffer)))


def test_zoom_in_is_centre_crop_resized_back_as_prepare_resizes(rng):
    """prepare's resize (resample.resize), which is Pillow's antialiased Lanczos up to
    Pillow's rounding between its two passes: within one grey level of it."""
    images = textured(size=64)
    out = zoom(images, 2.0, rng)
    assert out.shape == images.shape
    crop = images[0, 16:48, 16:48]
    np.testing.assert_array_equal(out[0], resize(crop, (64, 64), "lanczos"))
    pillow = np.asarray(Image.fromarray(crop).resize((64, 64), Image.Resampling.LANCZOS))
    assert np.abs(out[0].astype(int) - pillow).max() <= 1
    np.testing.assert_array_equal(zoom(images, 1.0, rng), images)


def test_zoom_out_shrinks_and_pads(rng):
    images = textured(size=64)
    out = zoom(images, 0.5, rng)
    assert out.shape == images.shape
    small = resize(images[0], (32, 32), "lanczos")
    np.testing.assert_array_equal(out[0, 16:48, 16:48], small)
    np.testing.assert_array_equal(out[0, 15, 16:48], small[0])  # mirrored border
    pillow = np.asarray(Image.fromarray(images[0]).resize((32, 32), Image.Resampling.LANCZOS))
    assert np.abs(small.astype(int) - pillow).max() <= 1


def test_info_bar_rows_dark_with_light_text_rest_untouched(rng):
    images = textured(size=64)
    out = info_bar(images, 0.15, rng)
    height = round(0.15 * 64)
    bar = out[:, -height:]
    np.testing.assert_array_equal(out[:, :-height], images[:, :-height])
    assert np.median(bar) == 0 and (bar == 0).mean() > 0.5  # dark strip
    assert (bar > 100).mean() > 0.05 and (bar == 255).any()  # light text and scale bar
    np.testing.assert_array_equal(bar[0], bar[1])  # the same bar on every image
    np.testing.assert_array_equal(info_bar(images, 0.0, rng), images)  # removed = clean


def test_info_bar_is_found_by_prepare_s_detector(rng):
    from multifusion.data import infobar
    images = textured(n=3, size=64)
    for fraction in (0.08, 0.15):
        out = info_bar(images, fraction, rng)
        for image in out:
            assert infobar.find_info_bar(image) == 64 - round(fraction * 64)


class MeanBrightnessClassifier(torch.nn.Module):
    """Class = bright vs dark image by global mean: rotation-invariant, brightness-fragile."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold  # normalised mean grey that separates the classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) -> (B, 2)
        m = x.mean(dim=(1, 2, 3)) - self.threshold  # (B,)
        return torch.stack([-m, m], dim=1) * 20


def test_evaluate_under_shifts_scores_each_severity(make_config):
    from multifusion.data.dataset import to_model_input
    from multifusion.evaluation.robustness import evaluate_under_shifts, robustness_table

    cfg = make_config({"robustness.brightness": [0.5], "robustness.batch_size": 5, "data.grey_levels": "raw"})
    rng = np.random.default_rng(3)
    labels = np.array([0, 1] * 6)
    images = np.where(labels[:, None, None] == 1, 170, 80).astype(np.uint8) + rng.integers(0, 5, (12, 32, 32)).astype(
        np.uint8
    )
    threshold = to_model_input(np.full((1, 8, 8), 125, np.uint8)).mean().item()
    result = evaluate_under_shifts(MeanBrightnessClassifier(threshold), images, labels, cfg, temperature=1.0)
    assert result["n_images"] == 12
    assert result["clean"]["accuracy"] == 1.0 and result["clean"]["macro_f1"] == 1.0
    assert result["shifts"]["rotation"]["90"]["accuracy"] == 1.0
    assert result["shifts"]["brightness"]["0.5"]["accuracy"] == 0.5  # every image now "bright"
    assert set(result["shifts"]) == set(SHIFTS)
    table = robustness_table(result, "toy")
    n_levels = sum(len(getattr(cfg.robustness, name)) + 1 for name in SHIFTS)
    assert len(table) == n_levels and (table[table.level == 0].accuracy == 1.0).all()


def test_evaluate_under_shifts_keeps_per_image_calls_when_asked(make_config):
    """keep_predictions: the labels and every level's calls, consistent with its accuracy;
    without it the result (metrics/robustness.json) holds no per-image lists."""
    from multifusion.data.dataset import to_model_input
    from multifusion.evaluation.robustness import evaluate_under_shifts, robustness_table

    cfg = make_config({"robustness.brightness": [0.5], "robustness.batch_size": 5, "data.grey_levels": "raw"})
    labels = np.array([0, 1] * 6)
    images = np.where(labels[:, None, None] == 1, 170, 80).astype(np.uint8) + np.zeros((12, 32, 32), np.uint8)
    model = MeanBrightnessClassifier(to_model_input(np.full((1, 8, 8), 125, np.uint8)).mean().item())
    kept = evaluate_under_shifts(model, images, labels, cfg, keep_predictions=True)
    assert kept["labels"] == labels.tolist() and kept["clean"]["predictions"] == labels.tolist()
    bright = kept["shifts"]["brightness"]["0.5"]
    assert bright["predictions"] == [1] * 12 and bright["accuracy"] == 0.5
    for per in kept["shifts"].values():
        for entry in per.values():
            assert np.mean(np.array(entry["predictions"]) == labels) == pytest.approx(entry["accuracy"])
    plain = evaluate_under_shifts(model, images, labels, cfg)
    assert "labels" not in plain and "predictions" not in plain["clean"]
    assert list(robustness_table(kept, "toy").columns) == list(robustness_table(plain, "toy").columns)


class MeanRecorder(torch.nn.Module):
    """Records each input image's mean (model-input units); calls every image class 0."""

    def __init__(self):
        super().__init__()
        self.means: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) -> (B, 2)
        self.means += x.mean(dim=(1, 2, 3)).tolist()
        return torch.zeros(x.shape[0], 2)


@pytest.mark.parametrize("grey_levels, given", [("standardize", None), ("raw", None), ("raw", "standardize"), ("standardize", "raw")])
def test_a_shifted_image_goes_through_the_grey_level_policy_again(make_config, grey_levels, given):
    """Under the standardize policy every shifted image reaches the model standardized again
    (mean 128 grey levels), as a micrograph taken at that setting would in predict; under raw the
    brightness shift shows. The policy is ``data.grey_levels`` unless one is given (a loaded
    model's card: the robustness stage passes its own)."""
    from multifusion.data.dataset import to_model_input
    from multifusion.data.grey_levels import GREY_MEAN, standardize_grey_levels
    from multifusion.evaluation.robustness import evaluate_under_shifts

    cfg = make_config({"robustness.brightness": [0.5], "robustness.batch_size": 6, "data.grey_levels": grey_levels})
    policy = given or grey_levels
    images = standardize_grey_levels(textured(6, 48))  # as prepare stores them under standardize
    model = MeanRecorder()
    evaluate_under_shifts(model, images, np.zeros(6, int), cfg, grey_levels=given)
    means = np.array(model.means)  # every image of every level, clean first
    target = to_model_input(np.full((1, 1, 1), GREY_MEAN, np.uint8)).item()
    n_before_brightness = 6 * (1 + sum(len(getattr(cfg.robustness, name)) for name in list(SHIFTS)[: list(SHIFTS).index("brightness")]))
    bright = means[n_before_brightness : n_before_brightness + 6]
    if policy == "standardize":
        np.testing.assert_allclose(means, target, atol=0.05)  # 3 grey levels: rounding and clipping
    else:
        assert (bright > target + 0.5).all()  # +0.5 of the range, not undone
