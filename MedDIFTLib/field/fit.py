"""Robust, smooth fit of a displacement field to the matches of a lattice.

Normalised convolution (Knutsson and Westin, 1993): the field is the Gaussian-weighted mean of
the matched displacements around each node, each match weighted by its confidence,

    u = G * (w d) / G * w,

with ``G`` a Gaussian of standard deviation ``smoothness_mm``. Where the matches are too sparse
(outside the mask) a Gaussian four times wider fills in, so the field is defined everywhere. It
is made robust by iteratively reweighted means with Cauchy's weight: a match far from the fitted
field (a wrong match) loses its weight, so a few bad matches cannot pull the field. Each pass is
a few separable filters, so the fit costs milliseconds where a global least-squares solve costs
seconds, and the field that follows (instance optimisation) refines what a Gaussian blurs.
"""

from __future__ import annotations

import torch

from ..core.geometry import Geometry
from ..grid.displacement_field import DisplacementField
from ..grid.nodes import grid_points
from ..grid.vectors import vector_lengths
from .smoothing import gaussian_filter
from .solver import MatchTerm, minimise

FILL_WIDTH = 4.0
FILL_SHARE = 1e-2
FIT_ITERATIONS = 3
MATCH_SCALE_MM = 2.0


def _normalised_convolution(data: torch.Tensor, weights: torch.Tensor, sigma_kji) -> torch.Tensor:
    numerator = gaussian_filter(torch.cat([data * weights, weights[None]]), sigma_kji)
    wide = gaussian_filter(numerator, tuple(FILL_WIDTH * s for s in sigma_kji))
    fill = wide[:3] / wide[3:].clamp(min=1e-12)
    share = FILL_SHARE * float(numerator[3].max())
    return (numerator[:3] + share * fill) / (numerator[3:] + share)


def gaussian_fit(
    displacements_lps_mm: torch.Tensor,
    confidence: torch.Tensor,
    grid: Geometry,
    smoothness_mm: float,
    robust_iterations: int = 3,
    min_scale_mm: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a smooth field ``(3, K, J, I)`` to displacements ``(3, K, J, I)`` matched at the nodes of
    ``grid`` with ``confidence`` ``(K, J, I)`` (0: no match, e.g. outside the mask).

    Returns the field (LPS mm) and each node's final weight (confidence times robust weight).
    The Cauchy scale is 2.5 robust standard deviations of the residuals, at least ``min_scale_mm``.
    """
    data = displacements_lps_mm.float()
    confidence = confidence.float().clamp(min=0.0).nan_to_num(0.0)
    sigma_kji = tuple(float(smoothness_mm) / s for s in grid.spacing_mm[::-1])
    matched = confidence > 0
    weights = confidence
    if not bool(matched.any()):
        return torch.zeros_like(data), weights
    for iteration in range(robust_iterations + 1):
        fitted = _normalised_convolution(data, weights, sigma_kji)
        if iteration == robust_iterations:
            break
        residual = vector_lengths(fitted - data, 0)
        spread = 1.4826 * float(residual[matched].median())
        scale = max(2.5 * spread, min_scale_mm)
        weights = confidence / (1.0 + (residual / scale) ** 2)
    return fitted, weights


def robust_fit(
    matched: DisplacementField,
    confidence: torch.Tensor,
    smoothness_mm: float,
    break_gradient: float | None,
    robust_iterations: int = 3,
    iterations: int = FIT_ITERATIONS,
) -> DisplacementField:
    """The field on the lattice fitted to its ``matched`` displacements, each weighted by its node's
    ``confidence`` ``(K, J, I)`` (0: no match): :func:`gaussian_fit`, then
    ``iterations`` steps of the robust, edge-preserving fit (:func:`.solver.minimise`) of the
    matches (Charbonnier, scale ``MATCH_SCALE_MM``, weighted by ``confidence``) under the
    regulariser with ``break_gradient``, whose weight gives a smoothing length of about
    ``smoothness_mm``, so the field follows the matches on each side of a sliding interface."""
    grid = matched.geometry
    fitted, _ = gaussian_fit(matched.as_tensor(), confidence, grid, smoothness_mm, robust_iterations)
    found = confidence > 0
    if iterations <= 0 or not bool(found.any()):
        return DisplacementField.from_tensor(fitted, grid)
    nodes = grid_points(grid)
    term = MatchTerm.at_points(
        grid, nodes, matched.displacement_lps_mm.reshape(-1, 3), confidence.reshape(-1).numpy(), MATCH_SCALE_MM
    )
    regularisation = float(smoothness_mm) ** 2 * float(confidence[found].median())
    max_step_mm = float(min(grid.spacing_mm))
    fitted = minimise(fitted, grid, regularisation, break_gradient, iterations, max_step_mm, matches=term)
    return DisplacementField.from_tensor(fitted, grid)
