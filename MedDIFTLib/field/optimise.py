"""Instance optimisation: refine a displacement field on the descriptor similarity itself.

The search gives matches on a lattice and the fit smooths them; this step optimises the field
directly, as ConvexAdam does with MIND-SSC, on the energy

    E(u) = sum_nodes |g(x + u(x)) - f(x)|^2  +  regularisation * sum_edges |du / dx|^2

where ``f`` / ``g`` are the fixed / moving descriptors of the pyramid's finest level (L2-normalised
per voxel and averaged over the cells of the node grid, as ConvexAdam pools MIND to half
resolution; nodes about ``optimise_spacing_mm`` apart, resampled between voxels where whole-voxel
cells would miss that spacing: :func:`MedDIFTLib.grid.cells.cell_average`), ``u`` the displacement (mm) on that
node grid, the data term taken at the nodes inside the mask and the diffusion term (mm/mm) over
the whole grid.

It is minimised by Levenberg-Marquardt (Gauss-Newton with an adaptive damping) instead of
ConvexAdam's Adam: every step linearises the moving descriptors (their spatial gradients are
sampled with them) and solves the sparse, positive definite system
``(H + regularisation * L + damping) du = -(b + regularisation * L u)`` by block-Jacobi conjugate
gradients (a few iterations per step: each step is only a linearisation); a step that raises E
is refused and the damping raised. A handful of steps brings the field near the energy's
minimum, where Adam needs many more gradient steps, which keeps this stage cheap on a CPU. The
diffusion term keeps the field smooth and free of folds. A level with many channels is first
projected on its leading principal components (as DINO-Reg does with foundation features), so
the cost does not grow with the backbone's width; any pyramid works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..core.geometry import Geometry
from ..core.progress import ProgressFn, no_progress
from ..features.protocol import FeatureLevel, FeaturePyramid
from ..grid.cells import cell_average
from ..grid.sampling import sample, sample_lps
from ..matching.descriptors import unit_descriptors
from .solver import minimise

MAX_CHANNELS = 16
MAX_STEP_VOXELS = 0.5
LINEARISE_NODES = 1 << 17


@dataclass
class _SimilarityTerm:
    """The finest level's similarity term at the sample nodes."""

    fixed_features: torch.Tensor  # (C, N) pooled, normalised fixed descriptors at the nodes
    moving_base_ijk: torch.Tensor  # (N, 3) the nodes in pooled moving-level voxel coordinates
    mm_to_moving_ijk: torch.Tensor  # (3, 3): moving_ijk = base + u @ this
    moving_stack: torch.Tensor  # (4C, K, J, I) channels last: moving descriptors, then d/di, d/dj, d/dk

    @property
    def channels(self) -> int:
        return int(self.fixed_features.shape[0])


def pooled_descriptors(level: FeatureLevel, spacing_mm: float | np.ndarray) -> tuple[torch.Tensor, Geometry]:
    """The level's descriptors L2-normalised per voxel, then averaged over cells of about
    ``spacing_mm`` (one value or one per axis, :func:`MedDIFTLib.grid.cells.cell_average`); normalised
    slab by slab, so no float32 copy of the whole level is made."""
    return cell_average(level.values(), level.geometry, spacing_mm, lambda slab: unit_descriptors(level, slab))


def _principal_projection(fixed: torch.Tensor, moving: torch.Tensor, count: int) -> torch.Tensor | None:
    """(C, count) projection on the leading principal directions of both volumes' descriptors."""
    channels = fixed.shape[0]
    if channels <= count:
        return None
    samples = torch.cat([fixed.reshape(channels, -1), moving.reshape(channels, -1)], dim=1)
    stride = max(1, samples.shape[1] // 200_000)
    samples = samples[:, ::stride]
    samples = samples - samples.mean(dim=1, keepdim=True)
    _, vectors = torch.linalg.eigh(samples @ samples.T)
    return vectors[:, -count:]


def _project(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return features
    return torch.einsum("ckji,cd->dkji", features, projection).contiguous()


def _similarity_term(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    param_grid: Geometry,
    node_index: torch.Tensor,
    nodes_lps_mm: np.ndarray,
) -> _SimilarityTerm:
    """The similarity term at the nodes ``node_index`` (flat, raster order) of ``param_grid``.

    Only the finest level takes part: this step is for precision, the coarser levels have
    already given the capture range, and with them the optimum blurs (measured on the registration
    benchmark's pairs). Descriptors are pooled to the grid's cells; a level pooled
    onto exactly ``param_grid`` is taken as is, so fixed and moving descriptors are pooled alike.
    """
    spacing_mm = np.asarray(param_grid.spacing_mm)
    finest = fixed.finest_level
    fixed_features, fixed_geometry = pooled_descriptors(fixed.levels[finest], spacing_mm)
    moving_features, moving_geometry = pooled_descriptors(moving.levels[finest], spacing_mm)
    projection = _principal_projection(fixed_features, moving_features, MAX_CHANNELS)
    fixed_features = _project(fixed_features, projection)
    moving_features = _project(moving_features, projection)
    moving_affine = moving_geometry.affine_ijk_to_lps
    moving_ijk = np.linalg.solve(moving_affine[:3, :3], (nodes_lps_mm - moving_affine[:3, 3]).T).T
    if fixed_geometry.same_grid(param_grid):
        fixed_at_nodes = fixed_features.reshape(fixed_features.shape[0], -1)[:, node_index]
    else:
        fixed_at_nodes = sample_lps(fixed_features, fixed_geometry, nodes_lps_mm).T
    return _SimilarityTerm(
        fixed_features=fixed_at_nodes.contiguous(),
        moving_base_ijk=torch.as_tensor(moving_ijk, dtype=torch.float32),
        mm_to_moving_ijk=torch.as_tensor(np.linalg.inv(moving_affine[:3, :3]).T, dtype=torch.float32),
        moving_stack=_with_derivatives(moving_features),
    )


def _with_derivatives(features: torch.Tensor) -> torch.Tensor:
    """``(4C, K, J, I)`` stored channels last: the ``(C, K, J, I)`` features, then their central
    differences along i, j and k (one-sided at the ends, 0 along an axis of one voxel, as
    ``torch.gradient``), written straight into place."""
    channels = features.shape[0]
    stack = torch.empty((*features.shape[1:], 4 * channels), dtype=features.dtype, device=features.device)
    stack[..., :channels] = features.permute(1, 2, 3, 0)
    for block, axis in enumerate((3, 2, 1), start=1):
        target = stack[..., block * channels : (block + 1) * channels].permute(3, 0, 1, 2)
        size = features.shape[axis]
        if size < 2:
            target.zero_()
            continue
        torch.sub(features.narrow(axis, 1, 1), features.narrow(axis, 0, 1), out=target.narrow(axis, 0, 1))
        end = features.narrow(axis, size - 1, 1) - features.narrow(axis, size - 2, 1)
        target.narrow(axis, size - 1, 1).copy_(end)
        if size > 2:
            interior = target.narrow(axis, 1, size - 2)
            torch.sub(features.narrow(axis, 2, size - 2), features.narrow(axis, 0, size - 2), out=interior)
            interior.mul_(0.5)
    return stack.permute(3, 0, 1, 2)


def _linearise(term: _SimilarityTerm, displacement: torch.Tensor, derivatives: bool = True):
    """Data energy, gradient half ``b`` (3, N) and Gauss-Newton Hessian half ``H`` (3, 3, N) at
    node displacements ``(N, 3)`` (without ``derivatives``: the energy, None, None; only the
    descriptors are sampled), :data:`LINEARISE_NODES` nodes at a time (each node's terms are its own,
    so the temporaries of a large grid stay bounded)."""
    count = displacement.shape[0]
    energy = 0.0
    gradient = displacement.new_empty((3, count)) if derivatives else None
    hessian = displacement.new_empty((3, 3, count)) if derivatives else None
    for start in range(0, count, LINEARISE_NODES):
        part = slice(start, start + LINEARISE_NODES)
        part_energy, part_gradient, part_hessian = _linearise_nodes(term, displacement[part], part, derivatives)
        energy += part_energy
        if derivatives:
            gradient[:, part] = part_gradient
            hessian[:, :, part] = part_hessian
    return energy, gradient, hessian


def _linearise_nodes(term: _SimilarityTerm, displacement: torch.Tensor, nodes: slice, derivatives: bool):
    """:func:`_linearise` for the term's ``nodes`` at their displacements ``(n, 3)``; descriptors are
    handled channel-first, ``(C, n)``."""
    count = displacement.shape[0]
    channels = term.channels
    stack = term.moving_stack if derivatives else term.moving_stack[:channels]
    samples = sample(stack, term.moving_base_ijk[nodes] + displacement @ term.mm_to_moving_ijk).T
    residual = samples[:channels] - term.fixed_features[:, nodes]
    energy = float(residual.pow(2).sum())
    if not derivatives:
        return energy, None, None
    derivative_ijk = samples[channels:].reshape(3, channels, count)
    gradient_ijk = (derivative_ijk * residual).sum(dim=1)
    hessian_ijk = displacement.new_empty((3, 3, count))
    for row in range(3):
        for column in range(row, 3):
            hessian_ijk[row, column] = (derivative_ijk[row] * derivative_ijk[column]).sum(dim=0)
            hessian_ijk[column, row] = hessian_ijk[row, column]
    to_mm = term.mm_to_moving_ijk  # gradient_mm = to_mm @ gradient_ijk
    gradient = to_mm @ gradient_ijk
    left = (to_mm @ hessian_ijk.reshape(3, -1)).reshape(3, 3, count)
    hessian = (left.permute(0, 2, 1) @ to_mm.T).permute(0, 2, 1)
    return energy, gradient, hessian.contiguous()


def instance_optimise(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    initial: torch.Tensor,
    param_grid: Geometry,
    inside: Callable[[np.ndarray], np.ndarray],
    iterations: int,
    regularisation: float,
    progress: ProgressFn = no_progress,
    *,
    break_gradient: float | None = None,
) -> torch.Tensor:
    """Refine ``initial`` node values ``(3, K, J, I)`` (LPS mm) on ``param_grid``.

    The similarity term is taken at the nodes where ``inside(points_lps_mm)`` holds (the region or
    a user mask); the regulariser is :class:`.solver.Smoothness` with ``break_gradient``, and the
    field may break where organs slide but not fold (:func:`.solver.minimise`). ``iterations`` counts
    Levenberg-Marquardt steps, refused ones included.
    """
    kji = np.argwhere(np.ones(param_grid.shape_kji, bool))
    nodes = param_grid.ijk_to_lps(kji[:, ::-1].astype(float))
    keep = inside(nodes)
    if iterations <= 0 or not keep.any():
        return initial.clone().float()
    count = len(nodes)
    node_index = torch.as_tensor(np.flatnonzero(keep))
    term = _similarity_term(fixed, moving, param_grid, node_index, nodes[keep])

    def similarity(flat: torch.Tensor, derivatives: bool) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
        energy, at_nodes_gradient, at_nodes_hessian = _linearise(term, flat[:, node_index].T, derivatives)
        if not derivatives:
            return energy, None, None
        gradient = flat.new_zeros((3, count))
        gradient[:, node_index] = at_nodes_gradient
        hessian = flat.new_zeros((3, 3, count))
        hessian[:, :, node_index] = at_nodes_hessian
        return energy, gradient, hessian

    return minimise(
        initial,
        param_grid,
        regularisation,
        break_gradient,
        iterations,
        MAX_STEP_VOXELS * float(np.min(param_grid.spacing_mm)),
        similarity,
        None,
        progress,
        unfold=True,
    )
