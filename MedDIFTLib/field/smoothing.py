"""Separable Gaussian smoothing of a field on its grid (the fit's normalised convolution, the
solver's regulariser)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_reach(sigma: float) -> int:
    """How many voxels on each side :func:`gaussian_filter` reads with ``sigma`` (voxels)."""
    return int(np.ceil(3.0 * sigma))


def gaussian_filter(values: torch.Tensor, sigma_kji: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian of ``(C, K, J, I)`` (sigma in voxels per axis), zero outside the grid."""
    result = values[None]
    for axis, sigma in enumerate(sigma_kji):
        if sigma <= 0 or values.shape[axis + 1] < 2:
            continue
        radius = min(gaussian_reach(sigma), values.shape[axis + 1] - 1)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=values.dtype) / sigma) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = len(taps)
        kernel = (taps / taps.sum()).reshape(shape).expand(values.shape[0], 1, *shape[2:])
        padding = [0, 0, 0]
        padding[axis] = radius
        result = F.conv3d(result, kernel, padding=tuple(padding), groups=values.shape[0])
    return result[0]
