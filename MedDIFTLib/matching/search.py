"""Searches of the point layout: the best candidate on a lattice around each prior (local), and
the best positions over the whole moving volume (dense: global mode, or a radius so large that
scoring the whole volume once is cheaper than the local lattice).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..grid.sampling import interpolate
from .candidates import CandidateLattice, patch_taps
from .descriptors import level_ijk, unit_descriptors
from .scorer import Scorer, resolving_levels
from .subvoxel import subvoxel_offsets


def local_search(
    scorer: Scorer,
    descriptors: list[torch.Tensor],
    priors_lps_mm: np.ndarray,
    lattice: CandidateLattice,
    subvoxel: bool,
    levels: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best candidate (B, 3) LPS mm and its score (B,) for one batch on one lattice, fusing
    ``levels`` (default all; see :meth:`Scorer.score`).

    Candidates outside the moving volume or the lattice's sphere are never chosen; a point
    with none left stays at its prior with score ``-inf``.
    """
    geometry = scorer.moving.image_geometry
    centre_ijk = np.round(geometry.lps_to_ijk(priors_lps_mm))
    offsets_ijk = lattice.offsets_ijk()
    candidates_ijk = centre_ijk[:, None, :] + offsets_ijk[None]
    inside = np.all((candidates_ijk >= 0) & (candidates_ijk <= np.asarray(geometry.shape_ijk) - 1), axis=2)
    rounding_mm = geometry.ijk_to_lps(centre_ijk) - priors_lps_mm
    from_prior_mm = rounding_mm[:, None, :] + lattice.offsets_mm(geometry)[None]
    within = np.einsum("bnk,bnk->bn", from_prior_mm, from_prior_mm) <= (lattice.radius_mm + 1e-6) ** 2
    scores = np.where(inside & within, scorer.score(descriptors, centre_ijk, lattice, levels).cpu().numpy(), -np.inf)
    best = scores.argmax(axis=1)
    rows = np.arange(len(best))
    best_score = scores[rows, best]
    best_ijk = candidates_ijk[rows, best]
    if subvoxel:
        best_ijk = best_ijk + subvoxel_offsets(scores.reshape(-1, *lattice.shape_kji), best) * lattice.stride
    best_lps = geometry.ijk_to_lps(best_ijk)
    found = np.isfinite(best_score)
    best_lps[~found] = priors_lps_mm[~found]
    return best_lps, best_score


def dense_candidates(
    scorer: Scorer,
    descriptors: list[torch.Tensor],
    step_mm: float,
    count: int,
    priors_lps_mm: np.ndarray | None = None,
    radius_mm: float | None = None,
) -> np.ndarray:
    """The ``count`` best positions (B, count, 3) over the whole moving volume on a lattice of
    ``step_mm`` (within ``radius_mm`` of each prior when given), best first.

    Each level that resolves the step (:func:`resolving_levels`) is correlated densely with the
    batch's patch descriptors (one ``conv3d``, the points as output channels) at its own
    resolution; finer levels wait for the local refinement of each candidate.
    """
    geometry = scorer.moving.image_geometry
    stride = np.maximum(1, np.round(step_mm / np.asarray(geometry.spacing_mm))).astype(int)
    axes = [np.arange(0, n, s) for n, s in zip(geometry.shape_ijk, stride)]
    k, j, i = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    lattice_lps = geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    levels = scorer.moving.levels
    coarse = resolving_levels(levels, step_mm)
    total = sum(scorer.weights[n] for n in coarse)
    fused = None
    for n in coarse:
        level, radius, step = levels[n], scorer.radii[n], scorer.steps[n]
        taps = patch_taps(radius, step)[1]
        batch = descriptors[n].shape[0]
        kernels = descriptors[n].transpose(1, 2).reshape(batch, level.channels, taps, taps, taps)
        features = unit_descriptors(level)[None]
        similarity = F.conv3d(features, kernels.to(features.dtype), padding=radius, dilation=step)[0] / taps**3
        coords = level_ijk(level, lattice_lps, similarity.device)
        weighted = interpolate(similarity[None], coords[None])[0] * (scorer.weights[n] / total)
        fused = weighted if fused is None else fused + weighted
    if radius_mm is not None and priors_lps_mm is not None:
        lattice_t = torch.as_tensor(lattice_lps, dtype=torch.float32, device=fused.device)
        priors_t = torch.as_tensor(priors_lps_mm, dtype=torch.float32, device=fused.device)
        fused = fused.masked_fill(torch.cdist(priors_t, lattice_t) > radius_mm + 1e-3, float("-inf"))
    best = fused.topk(min(count, fused.shape[1]), dim=1).indices.cpu().numpy()
    return lattice_lps[best]
