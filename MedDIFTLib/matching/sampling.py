"""Trilinear sampling of feature and vector volumes: the one ``grid_sample`` wrapper.

Volumes are ``(C, K, J, I)`` tensors (or batched ``(B, C, K, J, I)``) on a :class:`Geometry`;
coordinates are continuous voxel indices ``ijk`` (SimpleITK order, 0-based). Outside the grid
the border value is repeated, as ``F.interpolate`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..features.protocol import FeatureLevel


def normalised(ijk: torch.Tensor, shape_ijk: tuple[int, int, int]) -> torch.Tensor:
    """Voxel coordinates -> ``grid_sample``'s [-1, 1] (``align_corners=True``)."""
    sizes = torch.tensor(shape_ijk, dtype=ijk.dtype, device=ijk.device)
    return torch.where(sizes > 1, 2.0 * ijk / (sizes - 1).clamp(min=1) - 1.0, torch.zeros_like(ijk))


def interpolate(volume: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(B, C, N)`` of ``volume`` ``(B, C, K, J, I)`` at ``(B, N, 3)`` voxel coordinates."""
    shape_ijk = tuple(int(n) for n in volume.shape[2:][::-1])
    grid = normalised(ijk.to(volume.dtype), shape_ijk)[:, :, None, None, :]
    samples = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return samples[:, :, :, 0, 0]


def sample(values: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(N, C)`` of ``values`` ``(C, K, J, I)`` at voxel coordinates ``(N, 3)``."""
    return interpolate(values[None], ijk.reshape(1, -1, 3))[0].T


def sample_stored(values: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Float32 trilinear samples ``(N, C)`` of stored features ``(C, K, J, I)`` (any float dtype,
    e.g. half precision) at voxel coordinates ``(N, 3)``: the eight corners are gathered and only
    they are converted, never the whole level. Outside the grid the border value is repeated, as
    :func:`sample` does."""
    upper = torch.tensor(values.shape[1:][::-1], dtype=ijk.dtype, device=ijk.device) - 1
    clamped = ijk.reshape(-1, 3).clamp(min=torch.zeros_like(upper), max=upper)
    base = clamped.floor().clamp(max=(upper - 1).clamp(min=0))
    fraction = clamped - base
    base = base.long()
    top = upper.long()
    samples = torch.zeros((len(clamped), values.shape[0]), dtype=torch.float32, device=values.device)
    for corner in range(8):
        bits = [(corner >> axis) & 1 for axis in range(3)]
        index = [torch.minimum(base[:, axis] + bits[axis], top[axis]) for axis in range(3)]
        weight = torch.ones(len(clamped), dtype=torch.float32, device=values.device)
        for axis in range(3):
            weight = weight * (fraction[:, axis] if bits[axis] else 1.0 - fraction[:, axis])
        samples += weight[:, None] * values[:, index[2], index[1], index[0]].T.float()
    return samples


def level_ijk(level: FeatureLevel, points_lps_mm: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Continuous voxel coordinates (..., 3) on ``level``'s grid of LPS points (..., 3)."""
    points = np.asarray(points_lps_mm, float)
    ijk = level.geometry.lps_to_ijk(points.reshape(-1, 3)).reshape(points.shape)
    return torch.as_tensor(ijk, dtype=torch.float32, device=device)


def ensure_read(level: FeatureLevel, ijk: torch.Tensor, reach: int = 0) -> None:
    """Make ``level`` valid where trilinear reads at ``ijk`` (B, N, 3 continuous voxel coordinates)
    and ``reach`` voxels around them land: one box per row (a no-op on a complete level)."""
    if level.complete:
        return
    rows = ijk.cpu().double().numpy().reshape(len(ijk), -1, 3)
    level.ensure_boxes(np.floor(rows.min(axis=1)) - reach - 1, np.floor(rows.max(axis=1)) + reach + 3)


def unit_descriptors(level: FeatureLevel, features: torch.Tensor | None = None) -> torch.Tensor:
    """``features`` (default: the whole level, ``(C, ...)``) as float32 with unit L2 norm along
    channels; stored unit-norm levels are only converted, not normalised again."""
    values = (level.features if features is None else features).float()
    return values if level.unit_norm else F.normalize(values, dim=0)


def sample_descriptors(level: FeatureLevel, points_lps_mm: np.ndarray) -> torch.Tensor:
    """L2-normalised descriptors (..., C) of ``level`` at LPS points (..., 3), trilinear."""
    points = np.asarray(points_lps_mm, float)
    coords = level_ijk(level, points.reshape(-1, 3), level.features.device)
    ensure_read(level, coords.reshape(points.shape if points.ndim > 1 else (1, 3)))
    samples = sample_stored(level.features, coords)
    return F.normalize(samples, dim=1).reshape(*points.shape[:-1], level.channels)
