"""The point layout: match a set of fixed points (LPS mm) into the moving volume.

Each point's candidates form a lattice of moving voxels inside a sphere of ``search_radius_mm``
around its prior (default: the same world position): first every ``coarse_step_mm``, then every
voxel around the coarse best (``coarse_to_fine``), or the whole volume on the coarse lattice
first (``mode="global"``, or a radius reaching beyond the volume: :func:`dense_candidates`),
keeping a few distinct peaks; each lattice is searched by :func:`local_search`, scored by
:class:`.similarity.PatchSimilarity` through one plan per lattice. The coarse lattice is scored on
the levels that resolve its step (:func:`.similarity.resolving_levels`; finer ones would only
alias), the fine window on all. The best candidate is refined by a parabola,
then by a pattern search on the finest level alone within one of its voxels (:mod:`.subvoxel`: the
lattice steps over the image's voxels, which may be thick slices, and the coarse levels' wide patches
pull a peak towards the motion around it). Every match runs backwards (moving -> fixed) from its
lattice position, and that forward-backward distance and the peak similarity give the confidence
(:mod:`.correspondences`): the pattern search moves a match within a voxel but does not change how far
it is trusted (refined both ways, a wrong match comes back closer to where it started).

A match that comes out unreliable is then placed by its context (``context_mm``): the median
motion of the reliable matches of 26 points around it, on the faces, edges and corners of a cube,
each ``context_mm`` from it (twice that if fewer than ``CONTEXT_MIN_RELIABLE`` are reliable). Its
similarity, forward-backward distance and confidence stay those of its own match, so it stays
flagged unreliable: where the descriptor is ambiguous (homogeneous tissue, repeated vessels) the
neighbourhood's motion is a better guess than a far, untrusted peak.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.options import MatchOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeaturePyramid
from ..grid.sampling import interpolate
from .candidates import CandidateLattice, raster_offsets
from .correspondences import Correspondences
from .descriptors import level_ijk
from .similarity import PatchSimilarity, ScoringPlan, resolving_levels, voxel_similarity
from .subvoxel import pattern_applies, pattern_refine, subvoxel_offsets

DENSE_CANDIDATES = 16
DENSE_SHARE = 0.5
CONTEXT_MIN_RELIABLE = 4
_CUBE = np.array([step for step in itertools.product((-1, 0, 1), repeat=3) if any(step)], float)
CONTEXT_DIRECTIONS = _CUBE / np.linalg.norm(_CUBE, axis=1, keepdims=True)


def _distinct(candidates: np.ndarray, count: int, separation_mm: float) -> np.ndarray:
    """Per point, the first ``count`` of its ranked candidates (B, M, 3) that lie more than
    ``separation_mm`` from every one kept before (repeating the best when fewer are distinct)."""
    kept = np.repeat(candidates[:, :1], count, axis=1)
    for row, ranked in enumerate(candidates):
        chosen = [ranked[0]]
        for candidate in ranked[1:]:
            if len(chosen) == count:
                break
            if np.min(np.linalg.norm(np.asarray(chosen) - candidate, axis=1)) > separation_mm:
                chosen.append(candidate)
        kept[row, : len(chosen)] = chosen
    return kept


@dataclass(frozen=True)
class _Stages:
    """The searches of one direction: where each point's fine search starts (``dense``: its best
    distinct peaks over the whole volume, ``separation_mm`` apart; else the best of the ``coarse``
    lattice when there is one; else its prior) and the ``fine`` lattice searched from each start."""

    fine: ScoringPlan
    coarse: ScoringPlan | None
    dense: bool
    separation_mm: float


def _stages(similarity: PatchSimilarity, options: MatchOptions) -> _Stages:
    """The searches of one direction under ``options``. The first stage is the coarse lattice
    (``coarse_to_fine``), every voxel (otherwise), or the dense whole-volume lattice: in global mode,
    and whenever the local window would cover at least ``DENSE_SHARE`` of the volume (a huge radius),
    so work and memory stay bounded by the volume. The coarse lattice is scored on the levels that
    resolve its step, the fine lattice (around the first stage's best) on all."""
    geometry = similarity.moving.image_geometry
    coarse = CandidateLattice.around(geometry, options.search_radius_mm, options.coarse_step_mm)
    refine_radius = float(np.linalg.norm(coarse.stride * np.asarray(geometry.spacing_mm)))
    first = coarse if options.coarse_to_fine else CandidateLattice.around(geometry, options.search_radius_mm)
    shape = np.asarray(geometry.shape_ijk)
    window_share = np.prod(np.minimum(2 * first.half * first.stride + 1, shape)) / np.prod(shape)
    dense = options.mode == "global" or window_share >= DENSE_SHARE
    if not dense and not options.coarse_to_fine:
        return _Stages(similarity.plan(first), None, False, refine_radius)
    fine = similarity.plan(CandidateLattice.around(geometry, refine_radius))
    if dense:
        return _Stages(fine, None, True, refine_radius)
    return _Stages(fine, similarity.plan(first, resolving_levels(similarity.moving.levels, options.coarse_step_mm)),
                   False, refine_radius)


def _match_one_way(
    source: FeaturePyramid,
    target: FeaturePyramid,
    points_lps_mm: np.ndarray,
    priors_lps_mm: np.ndarray,
    options: MatchOptions,
    progress: ProgressFn,
    stage: str,
    refine: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match ``points_lps_mm`` of ``source`` into ``target``: the lattice's positions (N, 3; with
    the parabola when ``options.subvoxel``), the same moved by the pattern search on the finest
    level when ``refine`` (else the lattice's again), and the lattice scores (N,).

    Each batch searches the fine lattice from its starts (:func:`_stages`) and keeps each point's
    best; the dense stage starts from the best ``DENSE_CANDIDATES`` distinct peaks.
    """
    similarity = PatchSimilarity(source, target, options)
    stages = _stages(similarity, options)
    batch = similarity.batch_size(stages.fine)
    if stages.coarse is not None:
        batch = min(batch, similarity.batch_size(stages.coarse))
    if stages.dense:
        largest = max(level.geometry.num_voxels for level in target.levels)
        batch = min(batch, max(1, int(similarity.budget_bytes // (largest * 4 * 3))))
    radius = None if options.mode == "global" else options.search_radius_mm
    positions = np.zeros_like(points_lps_mm)
    scores = np.zeros(len(points_lps_mm))
    refined = np.zeros_like(points_lps_mm)
    for begin in range(0, len(points_lps_mm), batch):
        chunk = slice(begin, begin + batch)
        descriptors = similarity.fixed_descriptors(points_lps_mm[chunk])
        priors = priors_lps_mm[chunk]
        if stages.dense:
            ranked = dense_candidates(similarity, descriptors, options.coarse_step_mm, 8 * DENSE_CANDIDATES, priors,
                                      radius)
            starts = _distinct(ranked, DENSE_CANDIDATES, stages.separation_mm)
        elif stages.coarse is not None:
            starts = local_search(similarity, descriptors, priors, stages.coarse, False)[0][:, None]
        else:
            starts = priors[:, None]
        found = [local_search(similarity, descriptors, start, stages.fine, options.subvoxel)
                 for start in starts.transpose(1, 0, 2)]
        found_scores = np.stack([score for _, score in found])
        choice, rows = np.argmax(found_scores, axis=0), np.arange(len(starts))
        positions[chunk] = np.stack([position for position, _ in found])[choice, rows]
        scores[chunk] = found_scores[choice, rows]
        refined[chunk] = positions[chunk]
        matched = begin + np.flatnonzero(np.isfinite(scores[chunk]))
        if refine and len(matched):
            in_chunk = torch.as_tensor(matched - begin)
            refined[matched] = pattern_refine(similarity, [d[in_chunk] for d in descriptors], positions[matched])
        done = min(begin + batch, len(points_lps_mm))
        progress(stage, done / len(points_lps_mm), f"{done}/{len(points_lps_mm)} points")
    return positions, refined, scores


def local_search(
    similarity: PatchSimilarity,
    descriptors: list[torch.Tensor],
    priors_lps_mm: np.ndarray,
    plan: ScoringPlan,
    subvoxel: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Best candidate (B, 3) LPS mm and its score (B,) for one batch on the plan's lattice around
    each prior.

    Candidates outside the moving volume or the lattice's sphere are never chosen; a point
    with none left stays at its prior with score ``-inf``.
    """
    lattice = plan.lattice
    geometry = similarity.moving.image_geometry
    centre_ijk = np.round(geometry.lps_to_ijk(priors_lps_mm))
    candidates_ijk = centre_ijk[:, None, :] + lattice.offsets_ijk()[None]
    inside = np.all((candidates_ijk >= 0) & (candidates_ijk <= np.asarray(geometry.shape_ijk) - 1), axis=2)
    rounding_mm = geometry.ijk_to_lps(centre_ijk) - priors_lps_mm
    from_prior_mm = rounding_mm[:, None, :] + lattice.offsets_mm(geometry)[None]
    within = np.einsum("bnk,bnk->bn", from_prior_mm, from_prior_mm) <= (lattice.radius_mm + 1e-6) ** 2
    scores = np.where(inside & within, similarity.score(descriptors, centre_ijk, plan).cpu().numpy(), -np.inf)
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
    similarity: PatchSimilarity,
    descriptors: list[torch.Tensor],
    step_mm: float,
    count: int,
    priors_lps_mm: np.ndarray | None = None,
    radius_mm: float | None = None,
) -> np.ndarray:
    """The ``count`` best positions (B, count, 3) over the whole moving volume on a lattice of
    ``step_mm`` (within ``radius_mm`` of each prior when given), best first.

    Each level that resolves the step (:func:`.similarity.resolving_levels`) is scored the fast way
    over the whole level (:func:`.similarity.voxel_similarity`: one volume, the points as the
    correlation's output channels) and interpolated at the lattice; finer levels wait for the local
    refinement of each candidate.
    """
    geometry = similarity.moving.image_geometry
    stride = np.maximum(1, np.round(step_mm / np.asarray(geometry.spacing_mm))).astype(int)
    axes = [np.arange(0, n, s) for n, s in zip(geometry.shape_ijk, stride)]
    lattice_lps = geometry.ijk_to_lps(raster_offsets(axes))
    levels = resolving_levels(similarity.moving.levels, step_mm)
    fused = None
    for n, share in zip(levels, similarity.shares(levels)):
        level = similarity.moving.levels[n]
        whole = voxel_similarity(level, similarity.patches[n], descriptors[n], np.zeros((1, 3), int),
                                 [size + 2 * similarity.patches[n].radius for size in level.geometry.shape_ijk],
                                 np.ones(3, int))
        coords = level_ijk(level, lattice_lps, whole.device)
        weighted = interpolate(whole[None], coords[None])[0] * share
        fused = weighted if fused is None else fused + weighted
    if radius_mm is not None and priors_lps_mm is not None:
        lattice_t = torch.as_tensor(lattice_lps, dtype=torch.float32, device=fused.device)
        priors_t = torch.as_tensor(priors_lps_mm, dtype=torch.float32, device=fused.device)
        fused = fused.masked_fill(torch.cdist(priors_t, lattice_t) > radius_mm + 1e-3, float("-inf"))
    best = fused.topk(min(count, fused.shape[1]), dim=1).indices.cpu().numpy()
    return lattice_lps[best]


def check_points(geometry: Geometry, points_lps_mm: np.ndarray) -> np.ndarray:
    """The points as an (N, 3) array; rejects none, non-finite ones and ones outside ``geometry``."""
    points = np.asarray(points_lps_mm, float).reshape(-1, 3)
    if len(points) == 0:
        raise BadInputError("no points to match")
    if not np.isfinite(points).all():
        raise BadInputError("some points have non-finite coordinates")
    outside = np.flatnonzero(~geometry.contains_lps(points))
    if len(outside):
        listed = ", ".join(str(n + 1) for n in outside[:10]) + (" ..." if len(outside) > 10 else "")
        raise BadInputError(f"{len(outside)} of {len(points)} points lie outside the fixed volume (points {listed})")
    return points


def _placed_by_context(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    found: Correspondences,
    priors_lps_mm: np.ndarray,
    options: MatchOptions,
) -> np.ndarray:
    """Matched positions (N, 3) LPS mm with each unreliable one moved to its fixed point plus the
    median motion of the reliable matches among :data:`CONTEXT_DIRECTIONS` points at
    ``options.context_mm`` around it, then at twice that distance, where at least
    :data:`CONTEXT_MIN_RELIABLE` of them are reliable (inside the fixed volume, each searched
    around the same prior offset as the point); the others are kept."""
    points = found.fixed_points_lps_mm
    positions = found.points_lps_mm.copy()
    waiting = np.flatnonzero(~found.reliable)
    without_context = dataclasses.replace(options, context_mm=0.0)
    for distance_mm in (options.context_mm, 2 * options.context_mm):
        if not len(waiting):
            break
        around = points[waiting, None] + distance_mm * CONTEXT_DIRECTIONS[None]
        prior_offsets = np.broadcast_to((priors_lps_mm - points)[waiting, None], around.shape)
        inside = fixed.image_geometry.contains_lps(around.reshape(-1, 3)).reshape(around.shape[:2])
        motion_mm = np.full(around.shape, np.nan)
        if inside.any():
            neighbours = match_points(fixed, moving, around[inside], around[inside] + prior_offsets[inside],
                                      without_context)
            moved = neighbours.points_lps_mm - neighbours.fixed_points_lps_mm
            motion_mm[inside] = np.where(neighbours.reliable[:, None], moved, np.nan)
        enough = np.sum(np.isfinite(motion_mm[..., 0]), axis=1) >= CONTEXT_MIN_RELIABLE
        placed = waiting[enough]
        positions[placed] = points[placed] + np.nanmedian(motion_mm[enough], axis=1)
        waiting = waiting[~enough]
    return positions


def match_points(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    points_lps_mm: np.ndarray,
    priors_lps_mm: np.ndarray | None = None,
    options: MatchOptions | None = None,
    progress: ProgressFn = no_progress,
) -> Correspondences:
    """Find each fixed point (N, 3 LPS mm) in the moving volume.

    ``priors_lps_mm`` centres the local search (default: the same world position); the backward
    check then starts from each match minus the same prior offset. Points outside the fixed
    volume are rejected; a point whose window misses the moving volume is returned at its prior
    with confidence 0. Unreliable matches are placed by their context (``options.context_mm``,
    module docstring).
    """
    options = options or MatchOptions()
    points = check_points(fixed.image_geometry, points_lps_mm)
    priors = points if priors_lps_mm is None else np.asarray(priors_lps_mm, float).reshape(points.shape)
    searched_share = 0.9 if options.context_mm > 0 else 1.0
    forward_share = searched_share / 2 if options.backward_check else searched_share
    with torch.inference_mode():
        on_lattice, matched, similarity = _match_one_way(
            fixed, moving, points, priors, options, scaled(progress, 0.0, forward_share), "match",
            options.subvoxel and pattern_applies(moving),
        )
        if options.backward_check:
            back_priors = on_lattice - (priors - points)
            back, _, _ = _match_one_way(
                moving, fixed, on_lattice, back_priors, options, scaled(progress, forward_share, searched_share),
                "backward check", False,
            )
            forward_backward = np.linalg.norm(back - points, axis=1)
        else:
            forward_backward = np.full(len(points), np.nan)
    found = Correspondences.scored(points, matched, similarity, forward_backward, options)
    if options.context_mm > 0:
        unreliable = int(np.sum(~found.reliable))
        progress("context", searched_share, f"placing {unreliable} unreliable matches by their neighbours")
        if unreliable:
            found = dataclasses.replace(found, points_lps_mm=_placed_by_context(fixed, moving, found, priors, options))
        progress("context", 1.0, f"{unreliable} unreliable matches: placed where enough neighbours are reliable")
    return found
