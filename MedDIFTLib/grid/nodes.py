"""Node grids: a coarser grid whose nodes sit on voxels of an image, and the LPS points of a grid's
voxels (the lattice of fixed points that the engine matches and the field is fitted on)."""

from __future__ import annotations

import numpy as np

from ..core.geometry import Geometry
from .cells import pool_factors


def node_grid(geometry: Geometry, spacing_mm: float) -> Geometry:
    """A coarser grid whose nodes sit on voxels of ``geometry`` and cover all of it.

    Per axis the step is the whole number of voxels closest to ``spacing_mm`` (at least one,
    :func:`.cells.pool_factors`); node 0 is voxel 0 and the last node lies at or beyond the last voxel.
    """
    factors = pool_factors(geometry, spacing_mm)
    shape = np.ceil((np.asarray(geometry.shape_ijk) - 1) / factors).astype(int) + 1
    spacing = np.asarray(geometry.spacing_mm) * factors
    return Geometry.create(shape, spacing, geometry.origin_lps_mm, geometry.direction_matrix)


def grid_points(geometry: Geometry) -> np.ndarray:
    """LPS mm ``(N, 3)`` of every voxel of ``geometry`` in ``[k, j, i]`` raster order."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij")
    return geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float))
