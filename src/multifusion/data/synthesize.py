"""Synthetic SEM-10: SEM-like micrographs of the 10 NFFA classes with real nuisances.

A scene (morphology.py) is shaded like a secondary-electron image (bright edges, light
from the detector side), then given the nuisances of real micrographs: magnification,
rotation, brightness/contrast/gamma, defocus blur, shot noise, charging streaks, a
brightness gradient, and a burnt-in instrument info bar (dark or light strip with text
and a scale bar) of random height at the bottom. A few images are re-shots of the
previous scene (a small shift, fresh noise): the near-duplicates real folders hold.

Every image has its own RNG seeded from (seed, class, index), so generation is parallel
and order-free: ``generate_dataset`` gives the same bytes on any number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from multifusion.core.atomic import atomic_path
from multifusion.core.config import SynthesizeConfig
from multifusion.data.morphology import RENDERERS
from multifusion.data.parallel import parallel_map

# Image counts of the NFFA SEM dataset (Aversa et al. 2018): the long tail to reproduce.
NFFA_COUNTS: dict[str, int] = {
    "Biological": 973,
    "Fibres": 163,
    "Films_Coated_Surface": 1783,
    "MEMS_devices_and_electrodes": 4505,
    "Nanowires": 3821,
    "Particles": 3926,
    "Patterned_surface": 4748,
    "Porous_Sponge": 182,
    "Powder": 918,
    "Tips": 1625,
}
CLASSES: list[str] = sorted(NFFA_COUNTS)
RESHOT_PROB = 0.06  # share of images that re-shoot the previous scene (near-duplicates)
MARGIN = 1  # extra scene border: a re-shot drifts by up to a pixel


def class_counts(total: int, min_per_class: int) -> dict[str, int]:
    """Scale NFFA_COUNTS to ``total`` (largest remainder), each class at least ``min_per_class``."""
    if total < min_per_class * len(CLASSES):
        raise ValueError(f"synthesize.total={total} is below {len(CLASSES)} x synthesize.min_per_class={min_per_class}; "
                         "raise synthesize.total or lower synthesize.min_per_class in params.yaml")
    floored: set[str] = set()
    while True:
        free = [c for c in CLASSES if c not in floored]
        budget = total - min_per_class * len(floored)
        weight = sum(NFFA_COUNTS[c] for c in free)
        share = {c: budget * NFFA_COUNTS[c] / weight for c in free}
        low = {c for c in free if share[c] < min_per_class}
        if not low:
            break
        floored |= low
    counts = {c: int(share[c]) for c in free} | {c: min_per_class for c in floored}
    by_remainder = sorted(free, key=lambda c: (share[c] - int(share[c]), NFFA_COUNTS[c]), reverse=True)
    for c in by_remainder[: total - sum(counts.values())]:
        counts[c] += 1
    return {c: counts[c] for c in CLASSES}


def image_rng(seed: int, class_name: str, index: int, stream: int) -> np.random.Generator:
    """The RNG of one image: independent of generation order and process."""
    return np.random.default_rng([seed, CLASSES.index(class_name), index, stream])


def scene_index(seed: int, class_name: str, index: int) -> int:
    """Index of the scene image ``index`` shows: its own, or an earlier one it re-shoots."""
    while index > 0 and image_rng(seed, class_name, index, 0).random() < RESHOT_PROB:
        index -= 1
    return index


def sem_shade(z: np.ndarray, tone: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Secondary-electron look of a surface: edges bright, slopes lit from one side. (h, w)."""
    gy, gx = np.gradient(z)
    slope = np.hypot(gx, gy)
    light = rng.uniform(0, 2 * np.pi)
    directional = np.cos(light) * gx + np.sin(light) * gy
    image = 0.4 + tone + 0.25 * z / (np.abs(z).max() + 1e-6) + rng.uniform(0.8, 2.0) * slope
    image += rng.uniform(0.0, 0.8) * directional
    return image.astype(np.float32)


def add_nuisance(image: np.ndarray, rng: np.random.Generator, noise_rng: np.random.Generator) -> np.ndarray:
    """Blur, contrast, gradient, streaks and shot noise; returns uint8 (h, w)."""
    h, w = image.shape
    if rng.random() < 0.6:
        image = ndi.gaussian_filter(image, rng.uniform(0.3, 1.8))  # defocus
    lo, hi = np.percentile(image[::3, ::3], [1, 99])
    gain = rng.uniform(0.45, 0.95) / max(hi - lo, 1e-6)  # contrast
    offset = rng.uniform(0.0, 0.35) - lo * gain  # brightness
    ramp_x = rng.uniform(-0.12, 0.12) * (np.arange(w, dtype=np.float32) / w - 0.5)  # (w,)
    ramp_y = rng.uniform(-0.12, 0.12) * (np.arange(h, dtype=np.float32) / h - 0.5)  # (h,)
    image = image * np.float32(gain) + (np.float32(offset) + ramp_y[:, None] + ramp_x[None, :])
    if rng.random() < 0.3:  # charging: bright streaks along the scan lines, decaying
        for _ in range(int(rng.integers(1, 6))):
            row, thick, start = int(rng.integers(0, h)), int(rng.integers(1, 4)), int(rng.integers(0, w))
            decay = np.exp(-np.clip(np.arange(w) - start, 0, None) / rng.uniform(10, 120)) * (np.arange(w) >= start)
            image[row:row + thick] += np.float32(rng.uniform(0.15, 0.5)) * decay.astype(np.float32)
    image = np.clip(image, 0.0, 1.0) ** np.float32(rng.uniform(0.75, 1.35))  # gamma
    dose = np.float32(rng.uniform(15.0, 120.0))  # electrons per pixel at full brightness
    # Shot noise: Poisson(image * dose) / dose, in its Gaussian form (dose >= 15).
    image += np.sqrt(image / dose) * noise_rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def burn_info_bar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Overwrite the bottom rows with an instrument bar (text, scale bar, dark or light);
    returns the new image and the bar's height in rows."""
    h, w = image.shape
    bar_h = max(12, int(round(h * rng.uniform(0.06, 0.15))))
    dark = rng.random() < 0.65
    back = int(rng.integers(0, 30)) if dark else int(rng.integers(215, 256))
    ink = 255 - int(rng.integers(0, 40)) if dark else int(rng.integers(0, 40))
    bar = Image.new("L", (w, bar_h), back)
    draw = ImageDraw.Draw(bar)
    font = ImageFont.load_default()
    fields = [f"HV {rng.uniform(1, 30):.1f} kV", f"WD {rng.uniform(2, 15):.1f} mm", f"Mag {rng.integers(1, 300)} kx",
              rng.choice(["SE", "InLens", "ETD", "BSE"]), f"{int(rng.integers(2015, 2025))}-{int(rng.integers(1, 13)):02d}"]
    draw.text((int(rng.integers(2, 10)), int(rng.integers(1, max(2, bar_h - 11)))), "  ".join(fields[: int(rng.integers(2, 6))]),
              fill=ink, font=font)
    scale_len = int(w * rng.uniform(0.1, 0.25))
    x0 = w - scale_len - int(rng.integers(8, 30))
    y0 = int(bar_h * rng.uniform(0.3, 0.6))
    draw.rectangle([x0, y0, x0 + scale_len, y0 + max(1, bar_h // 10)], fill=ink)
    draw.text((x0, max(0, y0 - 11)), f"{int(rng.choice([100, 200, 500, 1, 2, 5]))} {rng.choice(['nm', 'um'])}",
              fill=ink, font=font)
    out = image.copy()
    out[h - bar_h:] = np.asarray(bar)
    return out, bar_h


def render_image(seed: int, class_name: str, index: int, width: int, height: int, info_bar: bool = True) -> np.ndarray:
    """One synthetic micrograph, uint8 (height, width); deterministic from its arguments.
    ``info_bar=False`` leaves out the bar (85% of images carry one)."""
    scene = scene_index(seed, class_name, index)
    scene_rng = image_rng(seed, class_name, scene, 1)
    mag = float(np.exp(scene_rng.uniform(np.log(0.6), np.log(1.7))))
    z, tone = RENDERERS[class_name](scene_rng, height + 2 * MARGIN, width + 2 * MARGIN, mag)
    shaded = sem_shade(z, tone, scene_rng)
    own = image_rng(seed, class_name, index, 2)
    dy, dx = (int(v) for v in own.integers(0, 2 * MARGIN + 1, 2)) if scene != index else (MARGIN, MARGIN)
    shaded = shaded[dy:dy + height, dx:dx + width]
    settings_rng = image_rng(seed, class_name, scene, 3)  # a re-shot keeps the instrument settings
    image = add_nuisance(shaded, settings_rng, own)
    bar_rng = image_rng(seed, class_name, scene, 4)  # same instrument: same bar
    if bar_rng.random() < 0.85 and info_bar:
        image, _ = burn_info_bar(image, bar_rng)
    return image


def file_name(class_name: str, index: int) -> str:
    return f"{class_name.lower()}_{index:04d}.tif"


def _write_one(task: tuple[int, str, int, int, int, str]) -> str:
    seed, class_name, index, width, height, out_dir = task
    path = Path(out_dir) / class_name / file_name(class_name, index)
    with atomic_path(path) as tmp:  # ".tif" kept: PIL picks the format by it
        Image.fromarray(render_image(seed, class_name, index, width, height)).save(tmp)
    return str(path)


def generate_dataset(cfg: SynthesizeConfig, seed: int, out_dir: str | Path, workers: int = 0,
                     progress: bool = True) -> dict[str, int]:
    """Write ``<out_dir>/<Class>/<class>_NNNN.tif`` (8-bit grey) for all classes on
    ``workers`` processes (0 = all cores); return the counts."""
    out_dir = Path(out_dir)
    counts = class_counts(cfg.total, cfg.min_per_class)
    for class_name in CLASSES:
        folder = out_dir / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tif"):
            stale.unlink()
    tasks = [(seed, c, i, cfg.width, cfg.height, str(out_dir)) for c in CLASSES for i in range(counts[c])]
    # Small chunks: render times differ several-fold between classes, and tasks are in class order.
    for _ in parallel_map(_write_one, tasks, workers, progress, desc="synthesize", chunksize=8):
        pass
    return counts
