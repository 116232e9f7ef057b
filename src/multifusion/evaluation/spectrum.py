"""The texture-scale signature of a micrograph: its radially averaged log power spectrum.

    profile = radial_log_spectrum(images_u8)     # uint8 (N, S, S) -> (N, BANDS) float64

How the image's variance is spread over spatial frequencies, from the largest structures
(band 0) to the pixel scale (the last band): particle size, pore size, magnification and
noise move it; flips and 90-degree rotations do not (the radius is symmetric), so it is the
same for every test-time view. The mean grey level is removed first and the profile's mean
over the bands afterwards: it records the spectrum's shape, not the image's brightness or
contrast. The unknown score ``knn_spectrum`` (:mod:`multifusion.evaluation.ood`) adds the
distance to the nearest training profiles to the penultimate-feature distance, which sees
what the classifier learned but not always how far the texture is from anything it saw.
"""

from __future__ import annotations

import numpy as np
import torch

BANDS = 32          # radial frequency bands from 0 to the Nyquist radius (the corners join the last band): at 64 px one
                    # band per frequency bin. The profile alone told the held-out NCM classes apart at AUROC 0.840 with
                    # 16 bands (two bins a band), 0.906 with 32 (bench/results/ood_texture_2026-12-08.txt)
FLOOR = 1e-3        # added to a band's mean power (pixel values 0..255) before the log: a flat image stays finite


def band_index(size: int, bands: int = BANDS) -> torch.Tensor:
    """(S, S) long: the radial band of every frequency of torch.fft.fft2 of an S x S image,
    floor(|f| / 0.5 * bands) with |f| in cycles per pixel, clipped to the last band."""
    f = torch.fft.fftfreq(size, dtype=torch.float64)  # (S,) cycles per pixel
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)  # (S, S)
    return torch.clamp((radius / 0.5 * bands).long(), max=bands - 1)


def radial_log_spectrum(images_u8: np.ndarray | torch.Tensor, bands: int = BANDS) -> torch.Tensor:
    """uint8 (N, S, S) -> (N, bands) float64: log mean power per radial band of each image
    (grey values 0..255, mean removed), minus the profile's mean over the bands."""
    x = torch.as_tensor(np.asarray(images_u8)).double()  # (N, S, S)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"radial_log_spectrum: expected square images (N, S, S), got {tuple(x.shape)}")
    x = x - x.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(x).abs().square().flatten(1)  # (N, S*S)
    band = band_index(x.shape[-1], bands).flatten()  # (S*S,)
    onehot = torch.nn.functional.one_hot(band, bands).double()  # (S*S, bands)
    profile = power @ onehot / onehot.sum(dim=0).clamp(min=1)  # (N, bands) mean power per band (0: a band no frequency of a tiny image falls in)
    profile = torch.log(profile + FLOOR)
    return profile - profile.mean(dim=1, keepdim=True)
