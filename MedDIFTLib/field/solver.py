"""Minimising an energy of a displacement field on a node grid, the one solver of the field stages.

The field ``u`` ``(3, K, J, I)`` (LPS mm) minimises

    E(u) = data(u) + regularisation * sum_nodes phi(|du/dx|^2)

where the data terms are a per-node one with 3x3 Hessian blocks (the descriptor similarity of
:mod:`.optimise`) and/or matches pulling the field at points (:class:`MatchTerm`: the lattice's
matches in the robust fit, the distinctive points' matches in the optimisation), and ``phi`` is
:class:`Smoothness`: diffusion for small gradients, total variation for large ones, so the field
may break where organs slide.

Levenberg-Marquardt: each step linearises the data terms (Gauss-Newton), reweights the regulariser
and the robust matches (IRLS), and solves the sparse, positive definite system
``(H + M + regularisation * L + damping) du = -gradient`` by block-Jacobi conjugate gradients (a few
iterations per step: each step is only a linearisation); a step that raises E is refused and the
damping raised; steps are capped at ``max_step_mm`` per node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..core.geometry import Geometry
from ..core.progress import ProgressFn, no_progress
from ..grid.vectors import vector_lengths
from .displacement import determinant_of_tensor
from .smoothing import gaussian_filter, gaussian_reach

CG_ITERATIONS = 10
FOLD_DETERMINANT = 0.1
FOLD_MARGIN = 1
UNFOLD_ROUNDS = 20

BlockTerm = Callable[[torch.Tensor, bool], tuple[float, torch.Tensor | None, torch.Tensor | None]]
"""A per-node data term: flat field ``(3, count)`` and whether derivatives are wanted -> energy,
gradient half ``(3, count)`` and Hessian half blocks ``(3, 3, count)`` (Gauss-Newton; None when
not wanted)."""


def _matvec(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Per-node 3x3 products: ``matrices`` (3, 3, N) times ``vectors`` (3, N)."""
    result = torch.empty_like(vectors)
    for row in range(3):
        torch.mul(matrices[row, 0], vectors[0], out=result[row])
        result[row].addcmul_(matrices[row, 1], vectors[1]).addcmul_(matrices[row, 2], vectors[2])
    return result


class Smoothness:
    """The regulariser on a node grid (spacing in mm per array axis, free boundaries):
    ``sum_nodes phi(|du/dx|^2)`` over forward differences, with Charbonnier's
    ``phi(s) = 2 e^2 (sqrt(1 + s / e^2) - 1)``: diffusion (``phi(s) ~ s``) where the displacement
    gradient is below ``break_gradient`` ``e`` (mm/mm), total variation (``~ 2 e |du/dx|``) above
    it, so the field may break where the anatomy slides instead of spreading the jump. ``None``:
    diffusion. It is minimised by
    reweighting: each step solves with the graph Laplacian whose edges carry ``phi'`` at the
    current field (``edge_weights``)."""

    def __init__(self, spacing_kji: tuple[float, float, float], break_gradient: float | None) -> None:
        self.inverse_squares = [1.0 / s**2 for s in spacing_kji]
        self.break_gradient = break_gradient

    def squared_gradient(self, field: torch.Tensor) -> torch.Tensor:
        """``|du/dx|^2`` per node ``(K, J, I)`` from forward differences (0 beyond the last node)."""
        squared = torch.zeros(field.shape[1:], dtype=field.dtype)
        for axis, inverse_square in enumerate(self.inverse_squares):
            dim = axis + 1
            if field.shape[dim] < 2:
                continue
            difference = torch.diff(field, dim=dim).pow_(2).sum(0)
            squared.narrow(axis, 0, field.shape[dim] - 1).add_(difference, alpha=inverse_square)
        return squared

    def _root(self, squared: torch.Tensor) -> torch.Tensor:
        """``sqrt(1 + s / e^2)`` per node (1 where the regulariser is diffusion)."""
        if self.break_gradient is None:
            return torch.ones_like(squared)
        return (1.0 + squared / self.break_gradient**2).sqrt_()

    def energy(self, squared: torch.Tensor) -> float:
        """``sum_nodes phi`` from the field's :meth:`squared_gradient`."""
        return float((2.0 * squared / (1.0 + self._root(squared))).sum())

    def edge_weights(self, squared: torch.Tensor) -> list[torch.Tensor | None]:
        """Per array axis, ``phi'`` over ``h^2`` on each edge (mean of its two nodes' ``phi'``), from
        the field's :meth:`squared_gradient`."""
        node = self._root(squared).reciprocal_()
        weights: list[torch.Tensor | None] = []
        for axis, inverse_square in enumerate(self.inverse_squares):
            size = node.shape[axis]
            if size < 2:
                weights.append(None)
                continue
            edge = node.narrow(axis, 0, size - 1) + node.narrow(axis, 1, size - 1)
            weights.append(edge.mul_(0.5 * inverse_square))
        return weights

    @staticmethod
    def apply(field: torch.Tensor, edge_weights: list[torch.Tensor | None]) -> torch.Tensor:
        """``L u`` for ``u`` of shape ``(3, K, J, I)`` with the given edge weights."""
        result = torch.zeros_like(field)
        for axis, weight in enumerate(edge_weights):
            if weight is None:
                continue
            dim = axis + 1
            size = field.shape[dim]
            difference = torch.diff(field, dim=dim).mul_(weight)
            result.narrow(dim, 0, size - 1).sub_(difference)
            result.narrow(dim, 1, size - 1).add_(difference)
        return result

    @staticmethod
    def diagonal(edge_weights: list[torch.Tensor | None], shape_kji: tuple[int, int, int]) -> torch.Tensor:
        """The Laplacian's diagonal ``(K, J, I)``: each node's incident edge weights."""
        diagonal = torch.zeros(shape_kji)
        for axis, weight in enumerate(edge_weights):
            if weight is None:
                continue
            size = shape_kji[axis]
            diagonal.narrow(axis, 0, size - 1).add_(weight)
            diagonal.narrow(axis, 1, size - 1).add_(weight)
        return diagonal


@dataclass
class MatchTerm:
    """The engine's matches pulling the field: at points between the grid's nodes (trilinear, the
    eight ``corners`` flat ``[k, j, i]`` node indices with ``corner_weights``; only the node itself where
    every point lies on one), the energy
    ``weight * phi(|u - displacement|^2)`` with Charbonnier's ``phi`` of scale ``scale_mm`` (a match
    farther than that from the field pulls less: robust to wrong matches)."""

    corners: torch.Tensor  # (M, 8) or (M, 1)
    corner_weights: torch.Tensor  # (M, 8) or (M, 1)
    displacement: torch.Tensor  # (3, M) LPS mm
    weight: torch.Tensor  # (M,)
    scale_mm: float

    @staticmethod
    def at_points(
        grid: Geometry, points_lps_mm: np.ndarray, displacement_lps_mm: np.ndarray, weight: np.ndarray, scale_mm: float
    ) -> MatchTerm:
        """The term for matches ``points -> points + displacement`` (N, 3) with ``weight`` (N,)."""
        shape = np.asarray(grid.shape_ijk)
        ijk = np.clip(grid.lps_to_ijk(np.asarray(points_lps_mm, float).reshape(-1, 3)), 0, shape - 1)
        nearest = np.round(ijk)
        ijk = np.where(np.abs(ijk - nearest) < 1e-6, nearest, ijk)  # a point on a node reads that node only
        low = np.minimum(np.floor(ijk), np.maximum(shape - 2, 0)).astype(int)
        fraction = ijk - low
        bits = np.array([[(corner >> axis) & 1 for axis in range(3)] for corner in range(8)])
        corner_ijk = np.minimum(low[:, None, :] + bits[None], shape - 1)
        weights = np.prod(np.where(bits[None] == 1, fraction[:, None], 1.0 - fraction[:, None]), axis=2)
        flat = (corner_ijk[..., 2] * shape[1] + corner_ijk[..., 1]) * shape[0] + corner_ijk[..., 0]
        if (np.count_nonzero(weights, axis=1) == 1).all():  # every point on a node (the lattice's matches)
            corner = np.argmax(weights, axis=1)[:, None]
            flat, weights = np.take_along_axis(flat, corner, 1), np.take_along_axis(weights, corner, 1)
        return MatchTerm(
            torch.as_tensor(flat),
            torch.as_tensor(weights, dtype=torch.float32),
            torch.as_tensor(np.asarray(displacement_lps_mm, np.float32).reshape(-1, 3).T).contiguous(),
            torch.as_tensor(np.asarray(weight, np.float32).reshape(-1)),
            float(scale_mm),
        )

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """Node values ``(3, count)`` interpolated at the points: ``(3, M)``."""
        return (flat[:, self.corners] * self.corner_weights).sum(-1)

    def scatter(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """The adjoint of :meth:`gather`: point values ``(C, M)`` spread onto ``count`` nodes."""
        spread = values[..., None] * self.corner_weights
        result = values.new_zeros((values.shape[0], count))
        return result.index_add_(1, self.corners.reshape(-1), spread.reshape(values.shape[0], -1))

    def linearise(self, flat: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Energy, gradient half ``(3, count)`` and the points' curvature ``(M,)`` at node values
        ``(3, count)``; the Hessian half is ``scatter(curvature * gather(.))``."""
        residual = self.gather(flat) - self.displacement
        scale = self.scale_mm**2
        ratio = 1.0 + residual.pow(2).sum(0) / scale
        energy = float((self.weight * (2.0 * scale) * (ratio.sqrt() - 1.0)).sum())
        curvature = self.weight * ratio.rsqrt()
        return energy, self.scatter(residual * curvature, flat.shape[1]), curvature

    def diagonal(self, curvature: torch.Tensor, count: int) -> torch.Tensor:
        """The diagonal ``(count,)`` of the Hessian half, for the preconditioner."""
        spread = curvature[:, None] * self.corner_weights.pow(2)
        return curvature.new_zeros(count).index_add_(0, self.corners.reshape(-1), spread.reshape(-1))


def _symmetric_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverses (3, 3, N) of symmetric positive definite 3x3 blocks (3, 3, N), by their adjugates
    (read from the upper triangle)."""
    a, b, c = blocks[0, 0], blocks[0, 1], blocks[0, 2]
    d, e, f = blocks[1, 1], blocks[1, 2], blocks[2, 2]
    cofactors = [d * f - e * e, c * e - b * f, b * e - c * d, a * f - c * c, b * c - a * e, a * d - b * b]
    scale = 1.0 / (a * cofactors[0] + b * cofactors[1] + c * cofactors[2])
    xx, xy, xz, yy, yz, zz = (cofactor.mul_(scale) for cofactor in cofactors)
    return torch.stack([torch.stack(row) for row in ((xx, xy, xz), (xy, yy, yz), (xz, yz, zz))])


def solve_step(
    hessian: torch.Tensor | None,
    rhs: torch.Tensor,
    edge_weights: list[torch.Tensor | None],
    regularisation: float,
    damping: float,
    matches: tuple[MatchTerm, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Solve ``(H + M + r L + d) x = rhs`` on the grid ``(3, K, J, I)`` by block-Jacobi CG, ``L`` the
    Laplacian with ``edge_weights`` (:class:`Smoothness`), ``M`` the match term's Hessian half at
    its points' ``curvature`` (``matches``: the term and the curvature).

    ``hessian`` (3, 3, K * J * I) holds every grid node's block (zero where there is no data term);
    None: no block term (with no matches or matches on nodes the preconditioner is then diagonal).
    """
    count = rhs[0].numel()
    weights = [None if weight is None else weight * regularisation for weight in edge_weights]
    shift = Smoothness.diagonal(weights, tuple(rhs.shape[1:])).reshape(-1).add_(damping)
    if matches is not None:
        shift += matches[0].diagonal(matches[1], count)
    if hessian is None and matches is not None and matches[0].corners.shape[1] != 1:
        hessian = rhs.new_zeros((3, 3, count))  # matches between nodes: block-Jacobi on their diagonal
    if hessian is None:
        damped, inverse_shift = None, shift.reciprocal()
    else:
        block_inverse = _symmetric_inverse(hessian + torch.eye(3)[:, :, None] * shift)
        damped = hessian.clone()
        damped.diagonal(dim1=0, dim2=1).add_(damping)

    def apply(vector: torch.Tensor) -> torch.Tensor:
        result = Smoothness.apply(vector, weights)
        flat = vector.view(3, -1)
        if damped is None:
            result.add_(vector, alpha=damping)
        else:
            result.view(3, -1).add_(_matvec(damped, flat))
        if matches is not None:
            term, curvature = matches
            result.view(3, -1).add_(term.scatter(term.gather(flat) * curvature, count))
        return result

    def precondition(vector: torch.Tensor) -> torch.Tensor:
        if damped is None:
            return vector.view(3, -1).mul(inverse_shift).view_as(vector)
        return _matvec(block_inverse, vector.view(3, -1)).view_as(vector)

    def dot(first: torch.Tensor, second: torch.Tensor) -> float:
        return float(torch.dot(first.reshape(-1), second.reshape(-1)))

    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    product = dot(residual, preconditioned)
    for _ in range(CG_ITERATIONS):
        image = apply(direction)
        curvature = dot(direction, image)
        if curvature <= 0 or product <= 0:
            break
        step = product / curvature
        solution.add_(direction, alpha=step)
        residual.sub_(image, alpha=step)
        preconditioned = precondition(residual)
        new_product = dot(residual, preconditioned)
        direction = preconditioned.add_(direction, alpha=new_product / product)
        product = new_product
    return solution


def unfolded(field: torch.Tensor, grid: Geometry) -> torch.Tensor:
    """``field`` ``(3, K, J, I)`` on ``grid`` with its folds smoothed away: where the Jacobian
    determinant is at most ``FOLD_DETERMINANT``, the field within ``FOLD_MARGIN`` nodes is replaced by
    its Gaussian smoothing (one node), up to ``UNFOLD_ROUNDS`` times. A sliding break, which keeps the
    determinant positive, is left as it is.

    Each round works in boxes around the folds (folds whose smoothing could meet share one box) and
    recomputes the determinant only there: the same field as smoothing the whole grid."""
    sigma_kji = (1.0, 1.0, 1.0)
    reach = gaussian_reach(max(sigma_kji))
    shape = grid.shape_kji
    field = field.clone()
    determinant = determinant_of_tensor(field, grid)
    for _ in range(UNFOLD_ROUNDS):
        folds_kji = np.nonzero(determinant <= FOLD_DETERMINANT)
        if not len(folds_kji[0]):
            break
        around = tuple(slice(int(axis.min()), int(axis.max()) + 1) for axis in folds_kji)
        around = _grown(around, FOLD_MARGIN + reach, shape)
        folding = determinant[around] <= FOLD_DETERMINANT
        components, _ = ndimage.label(ndimage.maximum_filter(folding, 2 * (FOLD_MARGIN + reach) + 1))
        local_boxes = ndimage.find_objects(components)
        boxes = [tuple(slice(o.start + b.start, o.start + b.stop) for o, b in zip(around, box)) for box in local_boxes]
        for label, (box, local) in enumerate(zip(boxes, local_boxes), start=1):
            near = ndimage.maximum_filter(folding[local] & (components[local] == label), 2 * FOLD_MARGIN + 1)
            values = field[(slice(None), *box)]
            smoothed = torch.where(torch.from_numpy(near), gaussian_filter(values, sigma_kji), values)
            field[(slice(None), *box)] = smoothed
        for box in boxes:
            changed = _grown(box, 1, shape)  # central differences reach one node
            source = _grown(changed, 1, shape)
            corner_ijk = np.array([[part.start for part in source[::-1]]], float)
            source_grid = Geometry.create(
                [part.stop - part.start for part in source[::-1]],
                grid.spacing_mm,
                grid.ijk_to_lps(corner_ijk)[0],
                grid.direction_matrix,
            )
            inner = tuple(slice(c.start - s.start, c.stop - s.start) for c, s in zip(changed, source))
            determinant[changed] = determinant_of_tensor(field[(slice(None), *source)], source_grid)[inner]
    return field


def _grown(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` (``[k, j, i]`` slices) grown by ``margin`` nodes on each side, within ``shape``."""
    return tuple(slice(max(part.start - margin, 0), min(part.stop + margin, size)) for part, size in zip(box, shape))


def minimise(
    initial: torch.Tensor,
    grid: Geometry,
    regularisation: float,
    break_gradient: float | None,
    iterations: int,
    max_step_mm: float,
    block_term: BlockTerm | None = None,
    matches: MatchTerm | None = None,
    progress: ProgressFn = no_progress,
    stage: str = "optimise",
    unfold: bool = False,
) -> torch.Tensor:
    """The field ``(3, K, J, I)`` on ``grid`` after ``iterations`` Levenberg-Marquardt steps
    (refused ones included) from ``initial``.

    With ``unfold`` the field may break but not fold: its folds are then smoothed away
    (:func:`unfolded`)."""
    field = initial.clone().float()
    count = field[0].numel()
    smoothness = Smoothness(tuple(float(s) for s in grid.spacing_mm[::-1]), break_gradient)

    def data_of(values: torch.Tensor, derivatives: bool = True):
        flat = values.reshape(3, -1)
        data, gradient, hessian = 0.0, flat.new_zeros((3, count)), None
        if block_term is not None:
            data, gradient, hessian = block_term(flat, derivatives)
        curvature = None
        if matches is not None:
            pull, pull_gradient, curvature = matches.linearise(flat)
            data += pull
            if derivatives:
                gradient += pull_gradient
        return data, gradient, (hessian, curvature)

    data, gradient, (hessian, curvature) = data_of(field)
    damping = 1e-9
    if hessian is not None:
        damping += 1e-3 * float(hessian.diagonal(dim1=0, dim2=1).mean())
    if matches is not None:
        damping += 1e-3 * float(matches.diagonal(curvature, count).mean())
    squared = smoothness.squared_gradient(field)
    energy = data + regularisation * smoothness.energy(squared)
    for iteration in range(iterations):
        if squared is not None:  # the field changed: reweight the regulariser
            edge_weights = smoothness.edge_weights(squared)
            rhs = Smoothness.apply(field, edge_weights).mul_(-regularisation)
            rhs.view(3, -1).sub_(gradient)
        pull = None if matches is None else (matches, curvature)
        step = solve_step(hessian, rhs, edge_weights, regularisation, damping, pull)
        step *= (max_step_mm / vector_lengths(step, 0).clamp(min=1e-12)).clamp(max=1.0)
        candidate = field + step
        last = iteration + 1 == iterations  # the last candidate is only compared: no derivatives
        candidate_data, candidate_gradient, candidate_curvatures = data_of(candidate, not last)
        squared = smoothness.squared_gradient(candidate)
        candidate_energy = candidate_data + regularisation * smoothness.energy(squared)
        if candidate_energy < energy:
            field, energy, gradient, (hessian, curvature) = (
                candidate,
                candidate_energy,
                candidate_gradient,
                candidate_curvatures,
            )
            damping /= 3.0
        else:
            squared = None  # refused: the field, its weights and right-hand side stay
            damping *= 10.0
        progress(stage, (iteration + 1) / iterations, f"step {iteration + 1}/{iterations}")
    return unfolded(field, grid) if unfold else field
