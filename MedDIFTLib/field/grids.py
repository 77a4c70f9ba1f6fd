"""Grid helpers for displacement fields: pooled grids, index maps, slabs and trilinear resampling.

Tensors holding a vector or feature field are ``(C, K, J, I)`` on a :class:`Geometry`; points
are LPS mm ``(N, 3)``; voxel coordinates are continuous ``ijk`` (SimpleITK order, 0-based).
Sampling is the engine's (:func:`MedDIFTLib.matching.sampling.sample`: trilinear, border repeated);
node grids are the lattice layout's (:func:`MedDIFTLib.matching.node_grid`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import Geometry
from ..matching.sampling import sample

SLAB_VOXELS = 2**21
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
    values: torch.Tensor, geometry: Geometry, spacing_mm: float | np.ndarray
) -> tuple[torch.Tensor, Geometry]:
    """``values`` ``(C, K, J, I)`` on ``geometry`` averaged over whole-voxel cells and, where the
    nodes lie between them, resampled (trilinear) onto :func:`cell_grid`; returns both."""
    factors, _ = cell_layout(geometry, spacing_mm)
    pooled, pooled_geometry = pool(values, factors), pooled_grid(geometry, factors)
    grid = cell_grid(geometry, spacing_mm)
    if grid.same_grid(pooled_geometry):
        return pooled, grid
    return resample(pooled, pooled_geometry, grid), grid


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


def pool(values: torch.Tensor, factors_ijk: np.ndarray) -> torch.Tensor:
    """Average ``(C, K, J, I)`` over cells of ``factors_ijk`` voxels (partial cells at the end)."""
    kernel = tuple(int(f) for f in np.asarray(factors_ijk)[::-1])
    if max(kernel) == 1:
        return values
    return F.avg_pool3d(values[None], kernel, stride=kernel, ceil_mode=True)[0]


def pool_factors(geometry: Geometry, spacing_mm: float) -> np.ndarray:
    """Per-axis whole factors (ijk) that bring ``geometry``'s voxels closest to ``spacing_mm``."""
    return np.maximum(1, np.round(spacing_mm / np.asarray(geometry.spacing_mm))).astype(int)


def index_map(source: Geometry, target: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` with ``source_ijk = matrix @ target_ijk + offset``."""
    source_affine = source.affine_ijk_to_lps
    target_affine = target.affine_ijk_to_lps
    matrix = np.linalg.solve(source_affine[:3, :3], target_affine[:3, :3])
    offset = np.linalg.solve(source_affine[:3, :3], target_affine[:3, 3] - source_affine[:3, 3])
    return matrix, offset


def sample_lps(values: torch.Tensor, geometry: Geometry, points_lps_mm: np.ndarray) -> torch.Tensor:
    """Trilinear samples ``(N, C)`` of ``values`` on ``geometry`` at LPS points ``(N, 3)``."""
    ijk = geometry.lps_to_ijk(np.asarray(points_lps_mm, float).reshape(-1, 3))
    return sample(values, torch.as_tensor(ijk, dtype=values.dtype, device=values.device))


def slabs(geometry: Geometry, max_voxels: int = SLAB_VOXELS) -> Iterator[tuple[int, int]]:
    """``(k_start, k_stop)`` ranges of whole ``k`` slices holding at most ``max_voxels`` each."""
    size_k = geometry.shape_ijk[2]
    per_slice = geometry.shape_ijk[0] * geometry.shape_ijk[1]
    step = max(1, max_voxels // max(per_slice, 1))
    for start in range(0, size_k, step):
        yield start, min(start + step, size_k)


def slab_ijk(geometry: Geometry, k_start: int, k_stop: int, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates ``(n, 3)`` of slices ``k_start:k_stop`` in ``[k, j, i]`` raster order."""
    axes = [
        torch.arange(k_start, k_stop, dtype=dtype),
        torch.arange(geometry.shape_ijk[1], dtype=dtype),
        torch.arange(geometry.shape_ijk[0], dtype=dtype),
    ]
    k, j, i = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1), k.reshape(-1)], dim=1)


def slab_lps(geometry: Geometry, k_start: int, k_stop: int) -> torch.Tensor:
    """LPS mm ``(n, 3)`` (float64) of the voxel centres of slices ``k_start:k_stop``."""
    affine = torch.as_tensor(geometry.affine_ijk_to_lps)
    return slab_ijk(geometry, k_start, k_stop, torch.float64) @ affine[:3, :3].T + affine[:3, 3]


def resample(values: torch.Tensor, source: Geometry, target: Geometry) -> torch.Tensor:
    """``values`` ``(C, K, J, I)`` on ``source`` resampled (trilinear) onto ``target``'s voxels."""
    matrix, offset = index_map(source, target)
    matrix_t = torch.as_tensor(matrix.T, dtype=torch.float32)
    offset_t = torch.as_tensor(offset, dtype=torch.float32)
    output = torch.empty((values.shape[0], *target.shape_kji), dtype=values.dtype)
    for k_start, k_stop in slabs(target):
        source_ijk = slab_ijk(target, k_start, k_stop) @ matrix_t + offset_t
        output[:, k_start:k_stop] = sample(values, source_ijk).T.reshape(-1, k_stop - k_start, *target.shape_kji[1:])
    return output
