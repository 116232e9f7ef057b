"""Height maps of the 10 NFFA nanomaterial classes, for the synthetic SEM set.

Each renderer draws one scene as a surface: ``render(rng, h, w, mag) -> (z, tone)``,
both float32 (h, w). ``z`` is the topography (the SEM shading in synthesize.py turns
slopes into the bright edges of secondary-electron images), ``tone`` the material
brightness (metal electrodes, dark pores). ``mag`` scales every feature size, so one
class is seen at many magnifications. Parameter ranges of look-alike classes (particles
/ powder / porous sponge / films, nanowires / fibres) deliberately overlap.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage as ndi

Scene = tuple[np.ndarray, np.ndarray]  # z (h, w), tone (h, w)


def smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, (h, w).

    Wide filters run on a coarse grid (sigma 2 there) that is then upsampled: the same
    field statistics at a fraction of the cost.
    """
    step = max(1.0, sigma / 2.0)
    if step == 1.0:
        field = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma, mode="wrap")
    else:
        gh, gw = int(np.ceil(h / step)), int(np.ceil(w / step))
        coarse = ndi.gaussian_filter(rng.standard_normal((gh, gw)).astype(np.float32), 2.0, mode="wrap")
        field = ndi.zoom(coarse, (h / gh, w / gw), order=1, grid_mode=True, mode="grid-wrap")[:h, :w]
    return field / (field.std() + 1e-6)


def rotated_grid(h: int, w: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates about the centre rotated by ``angle`` radians: (u, v), each (h, w)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x -= w / 2
    y -= h / 2
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def add_ellipsoids(z: np.ndarray, cy: np.ndarray, cx: np.ndarray, ry: np.ndarray, rx: np.ndarray,
                   angle: np.ndarray, height: np.ndarray, base: np.ndarray | None = None) -> None:
    """Raise ellipsoidal caps into ``z`` in place (max-composited), one window per body."""
    h, w = z.shape
    for i in range(len(cy)):
        r = max(ry[i], rx[i])
        y0, y1 = max(int(cy[i] - r) - 1, 0), min(int(cy[i] + r) + 2, h)
        x0, x1 = max(int(cx[i] - r) - 1, 0), min(int(cx[i] + r) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy[i])  # (hh, 1)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx[i])  # (1, ww)
        c, s = np.cos(angle[i]), np.sin(angle[i])
        q = ((c * dx + s * dy) / rx[i]) ** 2 + ((-s * dx + c * dy) / ry[i]) ** 2
        cap = height[i] * np.sqrt(np.clip(1.0 - q, 0.0, None)) + (0.0 if base is None else base[i])
        cap[q >= 1.0] = 0.0
        np.maximum(z[y0:y1, x0:x1], cap, out=z[y0:y1, x0:x1])


def rasterize_paths(h: int, w: int, paths: list[np.ndarray]) -> np.ndarray:
    """Boolean (h, w) mask of the centre lines of polylines given as (n, 2) arrays of (y, x)."""
    mask = np.zeros((h, w), dtype=bool)
    for path in paths:
        along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(path, axis=0).T))])
        t = np.arange(0.0, along[-1] + 0.5, 0.5)  # samples every half pixel
        rr = np.round(np.interp(t, along, path[:, 0])).astype(int)
        cc = np.round(np.interp(t, along, path[:, 1])).astype(int)
        keep = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        mask[rr[keep], cc[keep]] = True
    return mask


def tubes(h: int, w: int, paths: list[np.ndarray], radius: float) -> np.ndarray:
    """Height (h, w) of round tubes of ``radius`` along the paths (distance transform)."""
    mask = rasterize_paths(h, w, paths)
    if not mask.any():
        return np.zeros((h, w), np.float32)
    d = ndi.distance_transform_edt(~mask).astype(np.float32)
    return np.sqrt(np.clip(radius**2 - d**2, 0.0, None)) / max(radius, 1e-3)


def curved_path(rng: np.random.Generator, h: int, w: int, step: float, curl: float, n: int) -> np.ndarray:
    """A smooth random walk of ``n`` steps starting anywhere in a margin-padded frame, (n, 2)."""
    y, x = rng.uniform(-0.2 * h, 1.2 * h), rng.uniform(-0.2 * w, 1.2 * w)
    theta = rng.uniform(0, 2 * np.pi)
    turn = np.cumsum(rng.normal(0, curl, n))
    angles = theta + turn
    ys = y + np.cumsum(step * np.sin(angles))
    xs = x + np.cumsum(step * np.cos(angles))
    return np.stack([ys, xs], axis=1)


def particles(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Shaded spheres of varied size on a flat substrate, sparse to densely packed."""
    z = np.zeros((h, w), np.float32)
    r_mean = mag * rng.uniform(4.0, 12.0)
    coverage = rng.uniform(0.3, 1.6)
    n = min(int(coverage * h * w / (np.pi * r_mean**2)), 1200)
    r = r_mean * rng.lognormal(0.0, rng.uniform(0.15, 0.45), n)
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    add_ellipsoids(z, cy, cx, r, r * rng.uniform(0.85, 1.15, n), rng.uniform(0, np.pi, n), r / r_mean)
    tone = 0.1 * smooth_noise(rng, h, w, 20 * mag)
    return z, tone


def powder(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Aggregated irregular granules: clusters of small flattened bodies with rough surfaces."""
    z = np.zeros((h, w), np.float32)
    r_mean = mag * rng.uniform(2.5, 8.0)
    n_clusters = int(rng.uniform(4, 18) * h * w / (240 * 320))
    per = int(rng.uniform(15, 50))
    centres = np.stack([rng.uniform(0, h, n_clusters), rng.uniform(0, w, n_clusters)], 1)
    spread = r_mean * rng.uniform(2.0, 5.0)
    pts = np.repeat(centres, per, 0) + rng.normal(0, spread, (n_clusters * per, 2))
    n = len(pts)
    r = r_mean * rng.lognormal(0.0, 0.5, n)
    add_ellipsoids(z, pts[:, 0], pts[:, 1], r, r * rng.uniform(0.4, 1.0, n), rng.uniform(0, np.pi, n),
                   r / r_mean * rng.uniform(0.5, 1.2, n))
    z *= 1.0 + 0.35 * smooth_noise(rng, h, w, max(0.8, 0.6 * mag))
    tone = 0.1 * smooth_noise(rng, h, w, 15 * mag)
    return z, tone


def porous_sponge(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """A connected solid network around pores: a thresholded smooth random field."""
    field = smooth_noise(rng, h, w, mag * rng.uniform(2.0, 6.0))
    threshold = rng.uniform(-0.5, 0.4)
    solid = np.clip(field - threshold, 0.0, 1.2)
    z = solid + 0.15 * smooth_noise(rng, h, w, max(0.7, 0.5 * mag))
    tone = np.where(field < threshold, -0.35, 0.0).astype(np.float32)
    return z.astype(np.float32), ndi.gaussian_filter(tone, 1.0)


def films(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Smooth grainy film with cracks; some with sparse pits or debris particles."""
    z = 0.25 * smooth_noise(rng, h, w, max(0.7, mag * rng.uniform(0.8, 2.5)))
    z += 0.4 * smooth_noise(rng, h, w, 40 * mag)
    n_cracks = int(rng.integers(0, 7))
    if n_cracks:
        paths = [curved_path(rng, h, w, 3.0, 0.35, int(rng.integers(20, 120))) for _ in range(n_cracks)]
        z -= 1.2 * tubes(h, w, paths, mag * rng.uniform(0.8, 2.0))
    if rng.random() < 0.35:  # sparse pits, a look-alike of porous sponge
        field = smooth_noise(rng, h, w, mag * rng.uniform(2.0, 5.0))
        z -= 0.8 * np.clip(-field - rng.uniform(1.0, 1.8), 0.0, None)
    if rng.random() < 0.3:  # sparse debris, a look-alike of particles
        n = int(rng.integers(3, 25))
        r = mag * rng.uniform(2.0, 8.0, n)
        debris = np.zeros((h, w), np.float32)
        add_ellipsoids(debris, rng.uniform(0, h, n), rng.uniform(0, w, n), r, r, np.zeros(n), r / r.mean())
        z = np.maximum(z, debris)
    tone = 0.15 * smooth_noise(rng, h, w, 30 * mag)
    return z.astype(np.float32), tone


def nanowires(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Long thin straight rods of high aspect ratio, random or partly aligned, in layers."""
    z = np.zeros((h, w), np.float32)
    aligned = rng.random() < 0.35
    axis = rng.uniform(0, np.pi)
    for layer in range(3):
        n = int(rng.uniform(5, 25) * h * w / (240 * 320))
        paths = []
        for _ in range(n):
            length = mag * rng.uniform(40, 180)
            theta = axis + rng.normal(0, 0.2) if aligned else rng.uniform(0, np.pi)
            y, x = rng.uniform(0, h), rng.uniform(0, w)
            dy, dx = 0.5 * length * np.sin(theta), 0.5 * length * np.cos(theta)
            paths.append(np.array([[y - dy, x - dx], [y + dy, x + dx]]))
        z = np.maximum(z, (0.6 + 0.4 * layer) * tubes(h, w, paths, mag * rng.uniform(0.8, 2.2)))
    if rng.random() < 0.4:  # catalyst droplets or debris at the substrate
        n = int(rng.integers(5, 40))
        r = mag * rng.uniform(1.5, 4.0, n)
        add_ellipsoids(z, rng.uniform(0, h, n), rng.uniform(0, w, n), r, r, np.zeros(n), 0.5 * np.ones(n))
    tone = 0.1 * smooth_noise(rng, h, w, 25 * mag)
    return z, tone


def fibres(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Long curved overlapping strands of a few pixels' width, stacked into a mat."""
    z = np.zeros((h, w), np.float32)
    for layer in range(3):
        n = int(rng.uniform(3, 10) * h * w / (240 * 320))
        curl = rng.uniform(0.02, 0.12)
        paths = [curved_path(rng, h, w, 4.0, curl, int((h + w) / 3)) for _ in range(n)]
        z = np.maximum(z, (0.6 + 0.4 * layer) * tubes(h, w, paths, mag * rng.uniform(1.5, 6.0)))
    tone = 0.1 * smooth_noise(rng, h, w, 25 * mag)
    return z, tone


def patterned_surface(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Periodic lattices: pillars or holes on a square or hexagonal lattice, or gratings."""
    u, v = rotated_grid(h, w, rng.uniform(0, np.pi))
    period = mag * rng.uniform(7.0, 26.0)
    k = 2 * np.pi / period
    kind = rng.choice(["square", "hex", "grating"])
    if kind == "square":
        wave = (np.cos(k * u) + np.cos(k * v)) / 2
    elif kind == "hex":
        wave = (np.cos(k * u) + np.cos(k * (0.5 * u + 0.866 * v)) + np.cos(k * (0.5 * u - 0.866 * v))) / 3
    else:
        wave = np.cos(k * u)
    fill = rng.uniform(-0.4, 0.5)
    z = 1.0 / (1.0 + np.exp(-8.0 * (wave - fill)))
    if rng.random() < 0.5:
        z = 1.0 - z  # holes instead of pillars
    z += 0.1 * smooth_noise(rng, h, w, 1.0) + 0.2 * smooth_noise(rng, h, w, 40 * mag)
    tone = 0.15 * z
    return z.astype(np.float32), tone.astype(np.float32)


def mems(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Rectilinear electrodes: interdigitated combs, contact pads and traces, in metal."""
    angle = rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.04)
    u, v = rotated_grid(h, w, angle)
    mask = np.zeros((h, w), bool)

    def rect(cu: float, cv: float, hu: float, hv: float) -> None:
        mask[(np.abs(u - cu) < hu) & (np.abs(v - cv) < hv)] = True

    finger = mag * rng.uniform(3.0, 12.0)
    gap = finger * rng.uniform(0.8, 2.5)
    span = max(h, w)
    bus = mag * rng.uniform(8.0, 30.0)
    top, bottom = -rng.uniform(0.15, 0.45) * h, rng.uniform(0.15, 0.45) * h
    if rng.random() < 0.8:  # interdigitated comb between two bus bars
        rect(0, top - bus, span, bus)
        rect(0, bottom + bus, span, bus)
        pitch = 2 * (finger + gap)
        overlap = rng.uniform(0.6, 0.95) * (bottom - top)
        for i, cu in enumerate(np.arange(-span, span, pitch / 2)):
            if i % 2 == 0:
                rect(cu, top + overlap / 2, finger / 2, overlap / 2)
            else:
                rect(cu, bottom - overlap / 2, finger / 2, overlap / 2)
    for _ in range(int(rng.integers(1, 5))):  # pads and traces
        cu, cv = rng.uniform(-w / 2, w / 2), rng.uniform(-h / 2, h / 2)
        rect(cu, cv, mag * rng.uniform(10, 60), mag * rng.uniform(3, 50))
    z = ndi.gaussian_filter(mask.astype(np.float32), 0.8)
    tone = 0.35 * z + 0.08 * smooth_noise(rng, h, w, 1.0)
    return z, tone.astype(np.float32)


def tips(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """One to three tapered apexes (probe tips, needles), seen from the side on a plain field."""
    z = np.zeros((h, w), np.float32)
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        axis = np.pi / 2 + rng.normal(0, 0.5) + (np.pi if rng.random() < 0.25 else 0.0)
        apex_y, apex_x = rng.uniform(0.15, 0.7) * h, rng.uniform(0.2, 0.8) * w
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        # s: distance from the apex along the axis (towards the base), t: across it.
        s = -((y - apex_y) * np.sin(axis) + (x - apex_x) * np.cos(axis))
        t = -(y - apex_y) * np.cos(axis) + (x - apex_x) * np.sin(axis)
        half_width = mag * rng.uniform(0.5, 3.0) + np.clip(s, 0, None) * np.tan(rng.uniform(0.12, 0.5))
        q = np.clip(1.0 - (t / half_width) ** 2, 0.0, None)
        body = np.where(s > 0, np.sqrt(q) * np.clip(s / (10 * mag), 0.3, 1.5), 0.0)
        z = np.maximum(z, body.astype(np.float32))
    z += 0.05 * smooth_noise(rng, h, w, 1.0)
    tone = 0.2 * (z > 0.05) + 0.1 * smooth_noise(rng, h, w, 50 * mag)
    return z, tone.astype(np.float32)


def biological(rng: np.random.Generator, h: int, w: int, mag: float) -> Scene:
    """Cell-like bodies with bright membranes and textured interiors, linked by filaments."""
    z = np.zeros((h, w), np.float32)
    n = int(rng.uniform(3, 20) * h * w / (240 * 320) / mag)
    ry = mag * rng.uniform(8.0, 30.0, n)
    rx = ry * rng.uniform(0.5, 1.0, n)
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    add_ellipsoids(z, cy, cx, ry, rx, rng.uniform(0, np.pi, n), 0.6 * np.ones(n))
    inside = z > 0
    rim = inside & ~ndi.binary_erosion(inside, iterations=max(1, int(1.5 * mag)))
    z = z * (1.0 + 0.4 * smooth_noise(rng, h, w, max(0.8, 1.5 * mag)) * inside)
    if rng.random() < 0.8:
        paths = [curved_path(rng, h, w, 3.0, 0.25, int(rng.integers(20, 80))) for _ in range(int(rng.integers(3, 15)))]
        z = np.maximum(z, 0.5 * tubes(h, w, paths, mag * rng.uniform(0.6, 1.6)))
    tone = 0.45 * rim.astype(np.float32) + 0.1 * smooth_noise(rng, h, w, 20 * mag)
    return z.astype(np.float32), ndi.gaussian_filter(tone, 0.7)


RENDERERS: dict[str, Callable[[np.random.Generator, int, int, float], Scene]] = {
    "Biological": biological,
    "Fibres": fibres,
    "Films_Coated_Surface": films,
    "MEMS_devices_and_electrodes": mems,
    "Nanowires": nanowires,
    "Particles": particles,
    "Patterned_surface": patterned_surface,
    "Porous_Sponge": porous_sponge,
    "Powder": powder,
    "Tips": tips,
}
