"""Lattices of fixed points: node grids, their points, a displacement field read at points, and the
channels-last layout in which many-channel volumes are sampled at many points."""

from __future__ import annotations

import numpy as np
import torch

from ..core.geometry import Geometry
from .sampling import sample

# A displacement field: values (3, K, J, I) in LPS mm on a grid, ITK direction (fixed -> moving).
FieldOnGrid = tuple[torch.Tensor, Geometry]


def node_grid(geometry: Geometry, spacing_mm: float) -> Geometry:
    """A coarser grid whose nodes sit on voxels of ``geometry`` and cover all of it.

    Per axis the step is the whole number of voxels closest to ``spacing_mm`` (at least one);
    node 0 is voxel 0 and the last node lies at or beyond the last voxel.
    """
    factors = np.maximum(1, np.round(spacing_mm / np.asarray(geometry.spacing_mm))).astype(int)
    shape = np.ceil((np.asarray(geometry.shape_ijk) - 1) / factors).astype(int) + 1
    spacing = np.asarray(geometry.spacing_mm) * factors
    return Geometry.create(shape, spacing, geometry.origin_lps_mm, geometry.direction_matrix)


def grid_points(geometry: Geometry) -> np.ndarray:
    """LPS mm ``(N, 3)`` of every voxel of ``geometry`` in ``[k, j, i]`` raster order."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij")
    return geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float))


def channels_last(values: torch.Tensor) -> torch.Tensor:
    """``(C, K, J, I)`` stored with the channel axis fastest (same values): trilinear sampling of
    many channels at many points then reads each corner's channels together, several times faster."""
    return values.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def displacement_at(field: FieldOnGrid | None, points_lps_mm: np.ndarray) -> np.ndarray:
    """``(N, 3)`` displacement (LPS mm, trilinear, border repeated) of ``field`` at points; 0 without one."""
    if field is None:
        return np.zeros_like(points_lps_mm)
    values, geometry = field
    ijk = torch.as_tensor(geometry.lps_to_ijk(points_lps_mm), dtype=values.dtype)
    return sample(values, ijk).double().numpy()
