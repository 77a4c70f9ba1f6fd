"""Cell grids: voxels pooled into whole-voxel cells, and grids of cells of about a given spacing
(the nodes of the field's instance optimisation and of the automatic region's statistics).

Tensors are ``(C, K, J, I)`` on a :class:`Geometry`; factors are whole voxels per axis (ijk).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import Geometry
from .sampling import resample
from .slabs import SLAB_VOXELS, slabs

CELL_TOLERANCE = 0.1  # a whole-voxel cell may fall this share short of the asked spacing


def pooled_grid(geometry: Geometry, factors_ijk: np.ndarray) -> Geometry:
    """The grid of :func:`pool` with per-axis ``factors_ijk``: cell ``n`` covers voxels
    ``n*f .. n*f+f-1`` (the last cell may be partial), its node is the cells' centre."""
    factors = np.asarray(factors_ijk, int)
    origin = geometry.ijk_to_lps(((factors - 1) / 2.0)[None])[0]
    shape = -(-np.asarray(geometry.shape_ijk) // factors)
    return Geometry.create(shape, np.asarray(geometry.spacing_mm) * factors, origin, geometry.direction_matrix)


def cell_layout(geometry: Geometry, spacing_mm: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (ijk) whole pooling factors and node spacing (mm) of cells of about ``spacing_mm``
    (one value or one per axis).

    Whole voxels are pooled up to the spacing. Where that falls more than ``CELL_TOLERANCE`` short
    of it (3 mm cells of 2 mm voxels: pooling 2 would give 4 mm, pooling 1 stays at 2 mm) the nodes
    lie exactly ``spacing_mm`` apart instead; voxels coarser than the spacing stay as they are.
    """
    voxel = np.asarray(geometry.spacing_mm, float)
    target = np.broadcast_to(np.asarray(spacing_mm, float), (3,))
    factors = np.maximum(1, np.floor(target / voxel + 1e-6)).astype(int)
    pooled = factors * voxel
    return factors, np.where(pooled >= (1.0 - CELL_TOLERANCE) * target, pooled, target)


def cell_grid(geometry: Geometry, spacing_mm: float | np.ndarray) -> Geometry:
    """The node grid of cells of about ``spacing_mm`` (:func:`cell_layout`): the :func:`pooled_grid`
    where whole voxels fit, else nodes ``spacing_mm`` apart from the pooled grid's first node,
    within its extent."""
    factors, node_spacing = cell_layout(geometry, spacing_mm)
    pooled = pooled_grid(geometry, factors)
    if np.allclose(node_spacing, pooled.spacing_mm):
        return pooled
    extent = (np.asarray(pooled.shape_ijk) - 1) * np.asarray(pooled.spacing_mm)
    shape = np.ceil(extent / node_spacing - 1e-6).astype(int) + 1
    return Geometry.create(shape, node_spacing, pooled.origin_lps_mm, geometry.direction_matrix)


def cell_average(
    values: torch.Tensor,
    geometry: Geometry,
    spacing_mm: float | np.ndarray,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Geometry]:
    """``values`` ``(C, K, J, I)`` on ``geometry`` averaged over whole-voxel cells and, where the
    nodes lie between them, resampled (trilinear) onto :func:`cell_grid`; returns both.

    ``prepare`` (e.g. float32 conversion and normalisation of stored descriptors) is applied to
    slabs of whole cells along k (:func:`.slabs.slabs`, at most ``SLAB_VOXELS`` voxels of every
    channel) before they are pooled: the same cells as preparing the whole input, whose prepared
    copy then never exists whole."""
    factors, _ = cell_layout(geometry, spacing_mm)
    if prepare is None:
        pooled = pool(values, factors)
    else:
        ranges = slabs(geometry, max(1, SLAB_VOXELS // values.shape[0]), int(factors[2]))
        pooled = torch.cat([pool(prepare(values[:, start:stop]), factors) for start, stop in ranges], dim=1)
    pooled_geometry = pooled_grid(geometry, factors)
    grid = cell_grid(geometry, spacing_mm)
    if grid.same_grid(pooled_geometry):
        return pooled, grid
    return resample(pooled, pooled_geometry, grid), grid


def pool(values: torch.Tensor, factors_ijk: np.ndarray) -> torch.Tensor:
    """Average ``(C, K, J, I)`` over cells of ``factors_ijk`` voxels (partial cells at the end; an
    axis shorter than its factor is one partial cell)."""
    kernel = tuple(min(int(f), size) for f, size in zip(np.asarray(factors_ijk)[::-1], values.shape[1:]))
    if max(kernel) == 1:
        return values
    return F.avg_pool3d(values[None], kernel, stride=kernel, ceil_mode=True)[0]


def pool_factors(geometry: Geometry, spacing_mm: float) -> np.ndarray:
    """Per-axis whole factors (ijk) that bring ``geometry``'s voxels closest to ``spacing_mm``."""
    return np.maximum(1, np.round(spacing_mm / np.asarray(geometry.spacing_mm))).astype(int)
