"""Distribution shifts that real micrographs show, as image transforms.

Every shift maps a uint8 batch (N, S, S) to a uint8 batch of the same shape, given one
severity value and a random generator (used only by the noise shifts):

    noisy = SHIFTS["gaussian_noise"](images, 0.05, rng)

``SHIFTS`` names the shift functions; their severities live in the ``robustness``
section of params.yaml under the same names, mildest first. ``multifusion.evaluation.robustness``
scores a model under them.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from multifusion.data.resample import resize

ShiftFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"shift input must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    return images


def gaussian_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise, std as a fraction of full scale (255)."""
    x = _check(images).astype(np.float32)  # (N, H, W)
    return _to_uint8(x + rng.normal(0.0, std * 255.0, size=x.shape))


def poisson_noise(images: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: grey level x becomes Poisson(x / 255 * peak) photons, scaled back."""
    if peak <= 0:
        raise ValueError(f"poisson_noise: peak photons must be > 0, got {peak}")
    x = _check(images).astype(np.float64) / 255.0 * peak
    return _to_uint8(rng.poisson(x) / peak * 255.0)


def disk_kernel(radius: float) -> np.ndarray:
    """Normalised flat disk (defocus point-spread function), (2r+1, 2r+1)."""
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx**2 + yy**2 <= radius**2 + 1e-9).astype(np.float32)
    return disk / disk.sum()


def defocus_blur(images: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a disk of ``radius`` pixels (reflect-padded borders)."""
    _check(images)
    if radius <= 0:
        return images.copy()
    kernel = torch.from_numpy(disk_kernel(radius))[None, None]  # (1, 1, k, k)
    r = kernel.shape[-1] // 2
    x = torch.from_numpy(images.astype(np.float32))[:, None]  # (N, 1, H, W)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    y = F.conv2d(x, kernel)[:, 0]  # (N, H, W)
    return _to_uint8(y.numpy())


def contrast(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Scale each image's deviation from its own mean grey level by ``factor``."""
    x = _check(images).astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1)
    return _to_uint8(mean + factor * (x - mean))


def brightness(images: np.ndarray, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Add ``offset`` (fraction of full scale; negative darkens), clipped to [0, 255]."""
    return _to_uint8(_check(images).astype(np.float32) + offset * 255.0)


def jpeg_quality(images: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """Round trip through JPEG at ``quality`` (1-95) with PIL."""
    out = np.empty_like(_check(images))
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("L"))
    return out


def rotation(images: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Exact counter-clockwise rotation by a multiple of 90 degrees."""
    if degrees % 90 != 0:
        raise ValueError(f"rotation: only multiples of 90 degrees are exact, got {degrees}")
    return np.ascontiguousarray(np.rot90(_check(images), k=int(degrees) // 90 % 4, axes=(1, 2)))


def zoom(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Magnification change by ``factor``, same output size.

    factor > 1 zooms in: the centre 1/factor of the field, resized back up.
    factor < 1 zooms out: the image shrunk by factor, then reflect-padded back to size
    (the surroundings a wider field would show, mirrored from the image itself).
    Both resize with ``resample.resize`` (antialiased Lanczos-3), as ``prepare`` does.
    """
    _check(images)
    N, H, W = images.shape
    if factor <= 0:
        raise ValueError(f"zoom: factor must be > 0, got {factor}")
    out = np.empty_like(images)
    if factor >= 1:
        h, w = max(1, round(H / factor)), max(1, round(W / factor))
        top, left = (H - h) // 2, (W - w) // 2
        for i, image in enumerate(images):
            out[i] = resize(image[top : top + h, left : left + w], (H, W))
        return out
    h, w = max(1, round(H * factor)), max(1, round(W * factor))
    top, left = (H - h) // 2, (W - w) // 2
    for i, image in enumerate(images):
        small = resize(image, (h, w))
        out[i] = np.pad(small, ((top, H - h - top), (left, W - w - left)), mode="symmetric")
    return out


def _bar_font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(4, height - 2))
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def info_bar(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Burn an instrument info bar into the bottom ``fraction`` of the rows.

    What an uncropped micrograph shows: a black strip with white acquisition text on the
    left and a white scale bar with its length on the right. fraction 0 = bar removed.
    """
    _check(images)
    N, H, W = images.shape
    height = min(H, round(fraction * H))
    if height <= 0:
        return images.copy()
    bar = Image.new("L", (W, height), color=0)
    draw = ImageDraw.Draw(bar)
    font = _bar_font(height)
    draw.text((1, height / 2), "HV 5.00 kV  WD 8.1 mm  SE  mag 50 000 x", fill=255, font=font, anchor="lm")
    scale_left, scale_right = W - max(3, W // 5) - 1, W - 2
    draw.rectangle((scale_left - 2, 0, W - 1, height - 1), fill=0)  # text stops before the scale bar
    thickness = max(1, height // 4)
    top = (height - thickness) // 2
    draw.rectangle((scale_left, top, scale_right, top + thickness - 1), fill=255)
    out = images.copy()
    out[:, H - height :, :] = np.asarray(bar)[None]  # (N, height, W)
    return out


SHIFTS: dict[str, ShiftFn] = {
    "gaussian_noise": gaussian_noise,
    "poisson_noise": poisson_noise,
    "defocus_blur": defocus_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg_quality": jpeg_quality,
    "rotation": rotation,
    "zoom_in": zoom,
    "zoom_out": zoom,
    "info_bar": info_bar,
}


def apply_shift(name: str, images: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    if name not in SHIFTS:
        raise ValueError(f"unknown shift '{name}'; choose one of {', '.join(SHIFTS)}")
    return SHIFTS[name](images, severity, rng)
