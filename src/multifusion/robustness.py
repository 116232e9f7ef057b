"""Distribution shifts that real micrographs show, and a model's accuracy under them.

Every shift maps a uint8 batch (N, S, S) to a uint8 batch of the same shape, given one
severity value and a random generator (used only by the noise shifts):

    noisy = SHIFTS["gaussian_noise"](images, 0.05, rng)

``SHIFTS`` names the shift functions; their severities live in the ``robustness``
section of params.yaml under the same names, mildest first. Severity 0 of every shift
is the clean test split, so the table starts from the model's plain accuracy.

``evaluate_under_shifts`` runs a model over the clean and shifted test images and returns
accuracy and macro-F1 per shift per severity; ``plot_robustness`` draws accuracy against
severity level for one or several models.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from multifusion.config import Config
from multifusion.evaluate import classification_metrics, predict_probs

ShiftFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"shift input must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    return images


# ---- the shifts ---------------------------------------------------------------------


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


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) uint8 -> size=(H, W) uint8, Lanczos as in prepare (ingest.preprocess)."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS, reducing_gap=3.0))


def zoom(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Magnification change by ``factor``, same output size.

    factor > 1 zooms in: the centre 1/factor of the field, resized back up.
    factor < 1 zooms out: the image shrunk by factor, then reflect-padded back to size
    (the surroundings a wider field would show, mirrored from the image itself).
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
            out[i] = _resize(image[top : top + h, left : left + w], (H, W))
        return out
    h, w = max(1, round(H * factor)), max(1, round(W * factor))
    top, left = (H - h) // 2, (W - w) // 2
    for i, image in enumerate(images):
        small = _resize(image, (h, w))
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


# ---- evaluation ---------------------------------------------------------------------


def _scores(probs: np.ndarray, labels: np.ndarray, cfg: Config) -> dict[str, float]:
    metrics = classification_metrics(probs, labels, cfg.evaluate.ece_bins)
    return {"accuracy": float(metrics["top1"]), "macro_f1": float(metrics["macro_f1"])}


def evaluate_under_shifts(
    model: torch.nn.Module,
    images_u8: np.ndarray,
    labels: np.ndarray,
    cfg: Config,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
) -> dict:
    """Accuracy and macro-F1 of ``model`` on clean and shifted copies of ``images_u8``.

    images_u8: uint8 (N, S, S) test images, preprocessed as in training; labels: (N,).
    Returns ``{"n_images": N, "clean": {accuracy, macro_f1},
    "shifts": {shift: {str(severity): {severity, level, accuracy, macro_f1}}}}`` with
    levels numbered 1.. in the params order (mildest first). Deterministic from
    ``cfg.robustness.seed``.
    """
    rob = cfg.robustness
    images_u8 = np.ascontiguousarray(images_u8, dtype=np.uint8)
    labels = np.asarray(labels)

    def score(images: np.ndarray) -> dict[str, float]:
        # single views: the 8-view test-time average would hide the rotation shift and cost 8x
        probs = predict_probs(model, images, rob.batch_size, device, temperature)  # (N, C)
        return _scores(probs, labels, cfg)

    result: dict = {"n_images": int(len(labels)), "clean": score(images_u8), "shifts": {}}
    for shift_index, name in enumerate(SHIFTS):
        per_severity = {}
        for level, severity in enumerate(getattr(rob, name), start=1):
            rng = np.random.default_rng([rob.seed, shift_index, level])
            shifted = apply_shift(name, images_u8, severity, rng)
            per_severity[str(severity)] = {"severity": severity, "level": level, **score(shifted)}
        result["shifts"][name] = per_severity
    return result


def robustness_table(result: dict, model_name: str = "model") -> pd.DataFrame:
    """Long table: model, shift, level (0 = clean), severity, accuracy, macro_f1."""
    rows = []
    for shift, per_severity in result["shifts"].items():
        rows.append({"model": model_name, "shift": shift, "level": 0, "severity": 0.0, **result["clean"]})
        for entry in per_severity.values():
            rows.append({"model": model_name, "shift": shift, **entry})
    columns = ["model", "shift", "level", "severity", "accuracy", "macro_f1"]
    return pd.DataFrame(rows, columns=columns)


def plot_robustness(table: pd.DataFrame, path: str | Path) -> None:
    """One panel per shift: accuracy vs severity level, one line per model; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(dict.fromkeys(table["shift"]))
    cols = 4
    rows = (len(shifts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False, sharey=True)
    for ax, shift in zip(axes.flat, shifts):
        part = table[table["shift"] == shift]
        for model_name, line in part.groupby("model", sort=False):
            line = line.sort_values("level")
            ax.plot(line["level"], line["accuracy"], marker="o", label=model_name)
        levels = part.drop_duplicates("level").sort_values("level")
        ax.set_xticks(levels["level"], ["clean"] + [f"{s:g}" for s in levels["severity"][1:]], fontsize=7)
        ax.set_title(shift, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shifts) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower right", fontsize=8)
    fig.suptitle("Accuracy vs shift severity (test split)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
