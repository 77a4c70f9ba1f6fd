"""Descriptors of a feature level read at points: trilinear samples of unit L2 norm, and the level's
boxes made valid where those reads land (:class:`FeatureLevel` may hold only some boxes)."""

from __future__ import annotations

import numpy as np
import torch

from ..features.protocol import FeatureLevel
from ..grid.sampling import interpolate, sample_stored, windows
from ..grid.vectors import unit_vectors


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


def unit_descriptors(level: FeatureLevel, features: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
    """``features`` (default: the whole level, ``(C, ...)``; channels along ``dim``) as float32 with
    unit L2 norm along channels; stored unit-norm levels are only converted, not normalised again."""
    values = (level.features if features is None else features).float()
    return values if level.unit_norm else unit_vectors(values, dim)


def sample_descriptors(level: FeatureLevel, points_lps_mm: np.ndarray) -> torch.Tensor:
    """L2-normalised descriptors (..., C) of ``level`` at LPS points (..., 3), trilinear."""
    points = np.asarray(points_lps_mm, float)
    coords = level_ijk(level, points.reshape(-1, 3), level.features.device)
    ensure_read(level, coords.reshape(points.shape if points.ndim > 1 else (1, 3)))
    samples = sample_stored(level.features, coords)
    return unit_vectors(samples, 1).reshape(*points.shape[:-1], level.channels)


def sample_patches(level: FeatureLevel, points_lps_mm: np.ndarray) -> torch.Tensor:
    """L2-normalised descriptors (B, n, C) of ``level`` at B patches of n LPS points (B, n, 3),
    trilinear as :func:`sample_descriptors`: each patch's bounding box of voxels is copied once and
    sampled there (a patch is compact; gathers over the whole channel-first level are not)."""
    points = np.asarray(points_lps_mm, float)
    coords = level.geometry.lps_to_ijk(points.reshape(-1, 3)).reshape(points.shape)
    start = np.floor(coords.min(axis=1)).astype(int)
    sizes = (np.floor(coords.max(axis=1)).astype(int) - start).max(axis=0) + 2
    level.ensure_boxes(start, start + sizes)
    boxes = windows(level.features, start, sizes.tolist())
    relative = torch.as_tensor(coords - start[:, None, :], dtype=torch.float32, device=boxes.device)
    return unit_vectors(interpolate(boxes, relative), 1).transpose(1, 2)
