"""Descriptors of a feature level read at points: trilinear samples of unit L2 norm. Every read
goes through the level's readers (:meth:`FeatureLevel.values`, :meth:`FeatureLevel.boxes`,
:meth:`FeatureLevel.samples`), which fill a lazily filled level where it is read."""

from __future__ import annotations

import numpy as np
import torch

from ..features.protocol import FeatureLevel
from ..grid.sampling import interpolate
from ..grid.vectors import unit_vectors


def level_ijk(level: FeatureLevel, points_lps_mm: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Continuous voxel coordinates (..., 3) on ``level``'s grid of LPS points (..., 3)."""
    points = np.asarray(points_lps_mm, float)
    ijk = level.geometry.lps_to_ijk(points.reshape(-1, 3)).reshape(points.shape)
    return torch.as_tensor(ijk, dtype=torch.float32, device=device)


def unit_descriptors(level: FeatureLevel, features: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
    """``features`` read from ``level`` (default: the whole level, ``(C, ...)``; channels along
    ``dim``) as float32 with unit L2 norm along channels; stored unit-norm levels are only
    converted, not normalised again."""
    values = (level.values() if features is None else features).float()
    return values if level.unit_norm else unit_vectors(values, dim)


def sample_descriptors(level: FeatureLevel, points_lps_mm: np.ndarray) -> torch.Tensor:
    """L2-normalised descriptors (..., C) of ``level`` at LPS points (..., 3), trilinear (the level
    filled in one box per point, or per row of a (B, n, 3) array)."""
    points = np.asarray(points_lps_mm, float)
    coords = level_ijk(level, points.reshape(-1, 3), level.features.device)
    samples = level.samples(coords.reshape(len(points) if points.ndim > 1 else 1, -1, 3))
    return unit_vectors(samples, 1).reshape(*points.shape[:-1], level.channels)


def sample_patches(level: FeatureLevel, points_lps_mm: np.ndarray) -> torch.Tensor:
    """L2-normalised descriptors (B, n, C) of ``level`` at B patches of n LPS points (B, n, 3),
    trilinear as :func:`sample_descriptors`: each patch's bounding box of voxels is copied once and
    sampled there (a patch is compact; gathers over the whole channel-first level are not)."""
    points = np.asarray(points_lps_mm, float)
    coords = level.geometry.lps_to_ijk(points.reshape(-1, 3)).reshape(points.shape)
    start = np.floor(coords.min(axis=1)).astype(int)
    sizes = (np.floor(coords.max(axis=1)).astype(int) - start).max(axis=0) + 2
    boxes = level.boxes(start, sizes.tolist())
    relative = torch.as_tensor(coords - start[:, None, :], dtype=torch.float32, device=boxes.device)
    return unit_vectors(interpolate(boxes, relative), 1).transpose(1, 2)
