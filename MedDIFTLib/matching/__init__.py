"""Multi-level cosine matching of fixed points into a moving volume, in LPS mm.

For each fixed point the descriptor of every pyramid level is sampled (trilinear) at the point
and L2-normalised. Candidates are a lattice of moving-image voxels inside a sphere of
``search_radius_mm`` around a prior (default: the same world position). A candidate's score
is the weighted mean over levels of the cosine similarity.

Two ways to score a level, both memory-bounded (nothing is ever upsampled to the full image):
- native (default): cosine at the level's own voxels inside a box around the window, then
  trilinear interpolation of that similarity map at the candidates (when every level is wider
  than the candidate step, those levels are scored the exact way instead);
- exact: trilinear interpolation of the features at the candidates, then cosine. This equals
  "upsample all channels to the image grid, then cosine" (the reference implementation).

The best candidate is refined to sub-voxel precision by a parabola through its neighbours on
each axis. Every match then runs backwards (moving -> fixed); the forward-backward distance
and the peak's distinctiveness give a confidence in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.options import MatchOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeatureLevel, FeaturePyramid


@dataclass
class MatchResult:
    """Per fixed point: the matched moving point (LPS mm) and how far to trust it."""

    points_lps_mm: np.ndarray
    similarity: np.ndarray
    confidence: np.ndarray
    forward_backward_mm: np.ndarray
    reliable: np.ndarray


@dataclass(frozen=True)
class _Lattice:
    """Candidate offsets ``stride * o`` (moving voxels) with ``|o| <= half`` around a centre voxel."""

    half: np.ndarray  # (3,) ints, ijk
    stride: np.ndarray  # (3,) ints, ijk
    radius_mm: float

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(int(2 * h + 1) for h in self.half[::-1])

    def offsets_ijk(self) -> np.ndarray:
        """(Nc, 3) voxel offsets in ``[k, j, i]`` raster order (i fastest)."""
        axes = [np.arange(-h, h + 1) * s for h, s in zip(self.half, self.stride)]
        k, j, i = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)

    @staticmethod
    def around(geometry: Geometry, radius_mm: float, step_mm: float | None = None) -> _Lattice:
        spacing = np.asarray(geometry.spacing_mm)
        stride = np.ones(3, int) if step_mm is None else np.maximum(1, np.round(step_mm / spacing)).astype(int)
        half = np.ceil(radius_mm / (spacing * stride)).astype(int)
        return _Lattice(half, stride, radius_mm)


def _normalised_grid(coords_ijk: torch.Tensor, shape_ijk: tuple[int, int, int]) -> torch.Tensor:
    """Voxel coordinates -> grid_sample's [-1, 1] with ``align_corners=True``."""
    sizes = torch.tensor(shape_ijk, dtype=coords_ijk.dtype, device=coords_ijk.device)
    return torch.where(sizes > 1, 2.0 * coords_ijk / (sizes - 1).clamp(min=1) - 1.0, torch.zeros_like(coords_ijk))


def _interpolate(volume: torch.Tensor, coords_ijk: torch.Tensor, shape_ijk: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear samples of ``volume`` (B, C, K, J, I) at (B, N, 3) voxel coords -> (B, C, N).

    Coordinates outside the grid are clamped to its border, as ``F.interpolate`` does.
    """
    grid = _normalised_grid(coords_ijk, shape_ijk)[:, :, None, None, :]
    samples = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return samples[:, :, :, 0, 0]


def _level_coords(level: FeatureLevel, points_lps_mm: np.ndarray, device: torch.device) -> torch.Tensor:
    ijk = level.geometry.lps_to_ijk(points_lps_mm.reshape(-1, 3)).reshape(points_lps_mm.shape)
    return torch.as_tensor(ijk, dtype=torch.float32, device=device)


def _patch_offsets_ijk(radius: int) -> np.ndarray:
    """(n, 3) integer offsets of a (2r+1)^3 patch in ``[k, j, i]`` raster order (i fastest)."""
    steps = np.arange(-radius, radius + 1)
    k, j, i = np.meshgrid(steps, steps, steps, indexing="ij")
    return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)


def sample_descriptors(level: FeatureLevel, points_lps_mm: np.ndarray) -> torch.Tensor:
    """L2-normalised descriptors (..., C) of ``level`` at LPS points (..., 3), trilinear."""
    points = np.asarray(points_lps_mm, float)
    features = level.features
    coords = _level_coords(level, points.reshape(-1, 3), features.device)
    samples = _interpolate(features[None].float(), coords[None], level.geometry.shape_ijk)[0].T
    return F.normalize(samples, dim=1).reshape(*points.shape[:-1], level.channels)


class _Scorer:
    """Fused similarity of fixed descriptors against moving candidates, batch by batch.

    A level's similarity is the mean cosine over a patch of the moving level's voxels
    (``patch_radius`` r; r = 0 is the plain voxel cosine of the paper).
    """

    def __init__(self, fixed: FeaturePyramid, moving: FeaturePyramid, options: MatchOptions) -> None:
        if len(fixed.levels) != len(moving.levels):
            raise BadInputError("fixed and moving features come from different backbone configurations")
        weights = options.level_weights or tuple(level.weight for level in moving.levels)
        if len(weights) != len(moving.levels):
            raise BadInputError(f"{len(weights)} level weights for {len(moving.levels)} levels")
        total = float(sum(weights))
        if total <= 0:
            raise BadInputError("level weights must have a positive sum")
        self.fixed = fixed
        self.moving = moving
        self.weights = [w / total for w in weights]
        self.radii = [
            int(options.patch_radius if options.patch_radius is not None else level.patch_radius)
            for level in moving.levels
        ]
        self.exact = options.exact
        self.budget_bytes = options.memory_budget_mb * 2**20

    def fixed_descriptors(self, points_lps_mm: np.ndarray) -> list[torch.Tensor]:
        """Per level, (B, n_patch, C) fixed descriptors on the moving level's patch offsets."""
        descriptors = []
        for fixed_level, moving_level, radius in zip(self.fixed.levels, self.moving.levels, self.radii):
            offsets_mm = _patch_offsets_ijk(radius) @ moving_level.geometry.affine_ijk_to_lps[:3, :3].T
            positions = points_lps_mm[:, None, :] + offsets_mm[None]
            descriptors.append(sample_descriptors(fixed_level, positions))
        return descriptors

    def _box_layout(self, level: FeatureLevel, lattice: _Lattice) -> tuple[np.ndarray, np.ndarray]:
        """Stride and half-count (ijk, level voxels) of the similarity samples for one lattice.

        Where the lattice steps over several level voxels along an axis (and the axes agree),
        the level is scored only every ``stride`` voxels; ``half`` samples each side of the
        centre cover every candidate plus one sample for interpolation.
        """
        image = self.moving.image_geometry
        image_to_level = np.linalg.solve(level.geometry.affine_ijk_to_lps[:3, :3], image.affine_ijk_to_lps[:3, :3])
        extent = np.abs(image_to_level) @ (lattice.half * lattice.stride + 0.5)
        aligned = np.allclose(image_to_level, np.diag(np.diag(image_to_level)), atol=1e-6)
        step = np.abs(np.diag(image_to_level)) * lattice.stride
        stride = np.maximum(1, np.floor(step + 1e-6)).astype(int) if aligned else np.ones(3, int)
        half = np.ceil(extent / stride).astype(int) + 1
        return stride, half

    def _coarser_than(self, level: FeatureLevel, lattice: _Lattice) -> bool:
        """True where the level's voxels are wider than the lattice step along some axis."""
        image = self.moving.image_geometry
        image_to_level = np.linalg.solve(level.geometry.affine_ijk_to_lps[:3, :3], image.affine_ijk_to_lps[:3, :3])
        step_in_level_voxels = np.linalg.norm(image_to_level * lattice.stride[None, :], axis=0)
        return bool(np.any(step_in_level_voxels < 1.0 - 1e-6))

    def _exact_levels(self, lattice: _Lattice | None) -> list[bool]:
        """Which levels to score the exact way on this lattice.

        Interpolating a similarity map cannot place a peak between voxels wider than the lattice
        step. When some level is fine enough (MIND's full-resolution level), it localises the
        peak and coarser levels only add context, so all stay native. When none is (the
        diffusion levels: 1/4 to 1/16 of the grid), the coarse levels are scored exactly.
        """
        if self.exact or lattice is None:
            return [True] * len(self.moving.levels)
        coarse = [self._coarser_than(level, lattice) for level in self.moving.levels]
        return coarse if all(coarse) else [False] * len(coarse)

    def batch_size(self, lattice: _Lattice, num_candidates: int) -> int:
        per_point = 0
        for level, radius, exact in zip(self.moving.levels, self.radii, self._exact_levels(lattice)):
            patch = (2 * radius + 1) ** 3
            if exact:
                per_point = max(per_point, level.channels * num_candidates * patch * 4 * 2)
            else:
                stride, half = self._box_layout(level, lattice)
                box = int(np.prod(2 * (radius + stride * half) + 2))
                per_point = max(per_point, (level.channels * 2 + 2) * box * 4 + num_candidates * 16)
        return max(1, int(self.budget_bytes // max(per_point, 1)))

    def score(
        self,
        descriptors: list[torch.Tensor],
        candidates_lps_mm: np.ndarray,
        centres_lps_mm: np.ndarray,
        lattice: _Lattice | None,
    ) -> torch.Tensor:
        """Fused similarity (B, Nc) of B fixed descriptors at their (B, Nc, 3) candidates.

        Without a ``lattice`` (arbitrary candidates) every level is scored the exact way.
        """
        fused = None
        exact_levels = self._exact_levels(lattice)
        for level, descriptor, weight, radius, exact in zip(
            self.moving.levels, descriptors, self.weights, self.radii, exact_levels
        ):
            coords = _level_coords(level, candidates_lps_mm, level.features.device)
            if exact:
                similarity = self._score_exact(level, descriptor, coords, radius)
            else:
                similarity = self._score_native(level, descriptor, coords, centres_lps_mm, lattice, radius)
            fused = weight * similarity if fused is None else fused + weight * similarity
        return fused

    @staticmethod
    def _score_exact(level: FeatureLevel, descriptor: torch.Tensor, coords: torch.Tensor, radius: int) -> torch.Tensor:
        batch, count, _ = coords.shape
        offsets = torch.as_tensor(_patch_offsets_ijk(radius), dtype=coords.dtype, device=coords.device)
        positions = (coords[:, :, None, :] + offsets[None, None]).reshape(1, -1, 3)
        samples = _interpolate(level.features[None].float(), positions, level.geometry.shape_ijk)[0]
        samples = F.normalize(samples.reshape(level.channels, batch, count, len(offsets)), dim=0)
        return torch.einsum("cbnd,bdc->bn", samples, descriptor) / len(offsets)

    def _score_native(
        self,
        level: FeatureLevel,
        descriptor: torch.Tensor,
        coords: torch.Tensor,
        centres_lps_mm: np.ndarray,
        lattice: _Lattice,
        radius: int,
    ) -> torch.Tensor:
        """Patch cosine on the level's own voxels (every ``stride``), interpolated at candidates."""
        device = level.features.device
        shape_ijk = level.geometry.shape_ijk
        stride, half = self._box_layout(level, lattice)
        centre = np.floor(level.geometry.lps_to_ijk(centres_lps_mm) + 1e-6).astype(int)
        first = centre - stride * half
        start = torch.as_tensor(first - radius, device=device)
        box = [torch.arange(2 * (radius + s * h) + 2, device=device) for s, h in zip(stride, half)]
        index = [(start[:, axis, None] + box[axis][None]).clamp(0, shape_ijk[axis] - 1) for axis in range(3)]
        features = level.features[:, index[2][:, :, None, None], index[1][:, None, :, None], index[0][:, None, None, :]]
        features = F.normalize(features.float(), dim=0)
        batch = features.shape[1]
        width = 2 * radius + 1
        kernels = descriptor.transpose(1, 2).reshape(batch, level.channels, width, width, width)
        inputs = features.transpose(0, 1).reshape(1, batch * level.channels, *features.shape[2:])
        similarity = F.conv3d(inputs, kernels, stride=tuple(int(v) for v in stride[::-1]), groups=batch)[0]
        similarity = similarity / width**3
        upper = torch.tensor(shape_ijk, dtype=coords.dtype, device=device) - 1
        origin = torch.as_tensor(first, dtype=coords.dtype, device=device)[:, None, :]
        step = torch.as_tensor(stride, dtype=coords.dtype, device=device)
        relative = (coords.clamp(min=torch.zeros_like(upper), max=upper) - origin) / step
        samples_shape = tuple(int(n) for n in similarity.shape[1:][::-1])
        return _interpolate(similarity[:, None], relative, samples_shape)[:, 0]


def _subvoxel_offsets(scores: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Parabola vertex (B, 3) in lattice steps, ijk order, around ``best`` of (B, K, J, I) scores."""
    batch = scores.shape[0]
    flat_index = torch.arange(batch, device=scores.device)
    shape = scores.shape[1:]
    k, rest = best // (shape[1] * shape[2]), best % (shape[1] * shape[2])
    j, i = rest // shape[2], rest % shape[2]
    position = [k, j, i]
    offsets = torch.zeros(batch, 3, dtype=scores.dtype, device=scores.device)
    centre = scores[flat_index, k, j, i]
    for axis in range(3):
        lower, upper = [p.clone() for p in position], [p.clone() for p in position]
        lower[axis] = (position[axis] - 1).clamp(min=0)
        upper[axis] = (position[axis] + 1).clamp(max=shape[axis] - 1)
        minus = scores[(flat_index, *lower)]
        plus = scores[(flat_index, *upper)]
        curvature = minus - 2 * centre + plus
        usable = (
            (position[axis] > 0) & (position[axis] < shape[axis] - 1)
            & torch.isfinite(minus) & torch.isfinite(plus) & (curvature < 0)
        )
        delta = torch.where(usable, (minus - plus) / (2 * curvature.where(usable, -torch.ones_like(curvature))), 0.0)
        offsets[:, 2 - axis] = delta.clamp(-0.5, 0.5)
    return offsets


def _search(
    scorer: _Scorer,
    descriptors: list[torch.Tensor],
    priors_lps_mm: np.ndarray,
    lattice: _Lattice,
    subvoxel: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Best candidate (B, 3) LPS mm and its score (B,) for one batch on one lattice."""
    geometry = scorer.moving.image_geometry
    offsets = lattice.offsets_ijk()
    centre_ijk = np.round(geometry.lps_to_ijk(priors_lps_mm))
    candidates_ijk = centre_ijk[:, None, :] + offsets[None]
    candidates_lps = geometry.ijk_to_lps(candidates_ijk.reshape(-1, 3)).reshape(candidates_ijk.shape)
    inside = np.all((candidates_ijk >= 0) & (candidates_ijk <= np.asarray(geometry.shape_ijk) - 1), axis=2)
    within = np.linalg.norm(candidates_lps - priors_lps_mm[:, None, :], axis=2) <= lattice.radius_mm + 1e-6
    centres_lps = geometry.ijk_to_lps(centre_ijk)
    scores = scorer.score(descriptors, candidates_lps, centres_lps, lattice)
    valid = torch.as_tensor(inside & within, device=scores.device)
    scores = scores.masked_fill(~valid, float("-inf"))
    best_score, best = scores.max(dim=1)
    best_ijk = candidates_ijk[np.arange(len(best)), best.cpu().numpy()]
    if subvoxel:
        steps = _subvoxel_offsets(scores.reshape(-1, *lattice.shape_kji), best).cpu().numpy()
        best_ijk = best_ijk + steps * lattice.stride
    best_lps = geometry.ijk_to_lps(best_ijk)
    found = torch.isfinite(best_score).cpu().numpy()
    best_lps[~found] = priors_lps_mm[~found]
    return best_lps, best_score.cpu().numpy()


def _global_priors(scorer: _Scorer, descriptors: list[torch.Tensor], step_mm: float) -> np.ndarray:
    """Best position (B, 3) over the whole moving volume, on a lattice of ``step_mm``.

    Each level whose voxels are at least half the step is correlated densely with the batch's
    patch descriptors (one ``conv3d``, the points as output channels) at its own resolution;
    finer levels would only alias at this step, so they wait for the local refinement.
    """
    geometry = scorer.moving.image_geometry
    stride = np.maximum(1, np.round(step_mm / np.asarray(geometry.spacing_mm))).astype(int)
    axes = [np.arange(0, n, s) for n, s in zip(geometry.shape_ijk, stride)]
    k, j, i = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    lattice_lps = geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    levels = scorer.moving.levels
    coarse = [n for n, level in enumerate(levels) if min(level.geometry.spacing_mm) >= step_mm / 2]
    if not coarse:
        coarse = [int(np.argmax([np.prod(level.geometry.spacing_mm) for level in levels]))]
    total = sum(scorer.weights[n] for n in coarse)
    fused = None
    for n in coarse:
        level, radius = levels[n], scorer.radii[n]
        width = 2 * radius + 1
        batch = descriptors[n].shape[0]
        kernels = descriptors[n].transpose(1, 2).reshape(batch, level.channels, width, width, width)
        features = F.normalize(level.features.float(), dim=0)[None]
        similarity = F.conv3d(features, kernels.to(features.dtype), padding=radius)[0] / width**3
        coords = _level_coords(level, lattice_lps, similarity.device)
        sampled = _interpolate(similarity[None], coords[None], level.geometry.shape_ijk)[0]
        weighted = sampled * (scorer.weights[n] / total)
        fused = weighted if fused is None else fused + weighted
    best = fused.argmax(dim=1).cpu().numpy()
    return lattice_lps[best]


def _confidence(forward_backward_mm: np.ndarray, similarity: np.ndarray, options: MatchOptions) -> np.ndarray:
    """Gaussian of the forward-backward distance times the (non-negative) peak similarity."""
    agreement = np.exp(-0.5 * (np.nan_to_num(forward_backward_mm, nan=0.0) / options.fb_scale_mm) ** 2)
    peak = np.clip(np.nan_to_num(similarity, nan=0.0, neginf=0.0), 0.0, 1.0)
    return np.clip(agreement * peak, 0.0, 1.0)


def _match_one_way(
    source: FeaturePyramid,
    target: FeaturePyramid,
    points_lps_mm: np.ndarray,
    priors_lps_mm: np.ndarray,
    options: MatchOptions,
    progress: ProgressFn,
    stage: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Match ``points_lps_mm`` of ``source`` into ``target``: positions (N, 3) and scores (N,)."""
    scorer = _Scorer(source, target, options)
    geometry = target.image_geometry
    coarse = options.mode == "global" or options.coarse_to_fine
    if coarse:
        coarse_lattice = _Lattice.around(geometry, options.search_radius_mm, options.coarse_step_mm)
        fine_radius = float(np.linalg.norm(coarse_lattice.stride * np.asarray(geometry.spacing_mm)))
        fine_lattice = _Lattice.around(geometry, fine_radius)
    else:
        coarse_lattice = None
        fine_lattice = _Lattice.around(geometry, options.search_radius_mm)
    lattices = [lat for lat in (coarse_lattice, fine_lattice) if lat is not None]
    batch = min(scorer.batch_size(lat, len(lat.offsets_ijk())) for lat in lattices)
    if options.mode == "global":
        largest = max(level.geometry.num_voxels for level in target.levels)
        batch = min(batch, max(1, int(scorer.budget_bytes // (largest * 4 * 3))))
    positions = np.zeros_like(points_lps_mm)
    scores = np.zeros(len(points_lps_mm))
    for begin in range(0, len(points_lps_mm), batch):
        chunk = slice(begin, begin + batch)
        descriptors = scorer.fixed_descriptors(points_lps_mm[chunk])
        priors = priors_lps_mm[chunk]
        if options.mode == "global":
            priors = _global_priors(scorer, descriptors, options.coarse_step_mm)
        elif options.coarse_to_fine:
            priors, _ = _search(scorer, descriptors, priors, coarse_lattice, subvoxel=False)
        positions[chunk], scores[chunk] = _search(scorer, descriptors, priors, fine_lattice, options.subvoxel)
        done = min(begin + batch, len(points_lps_mm))
        progress(stage, done / len(points_lps_mm), f"{done}/{len(points_lps_mm)} points")
    return positions, scores


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


def match_points(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    points_lps_mm: np.ndarray,
    priors_lps_mm: np.ndarray | None = None,
    options: MatchOptions | None = None,
    progress: ProgressFn = no_progress,
) -> MatchResult:
    """Find each fixed point (N, 3 LPS mm) in the moving volume.

    ``priors_lps_mm`` centres the local search (default: the same world position); the backward
    check then starts from each match minus the same prior offset. Points
    outside the fixed volume are rejected; a point whose window misses the moving volume is
    returned at its prior with confidence 0.
    """
    options = options or MatchOptions()
    points = check_points(fixed.image_geometry, points_lps_mm)
    priors = points if priors_lps_mm is None else np.asarray(priors_lps_mm, float).reshape(points.shape)
    forward_share = 0.5 if options.backward_check else 1.0
    with torch.inference_mode():
        matched, similarity = _match_one_way(
            fixed, moving, points, priors, options, scaled(progress, 0.0, forward_share), "match"
        )
        if options.backward_check:
            back_priors = matched - (priors - points)
            back, _ = _match_one_way(
                moving, fixed, matched, back_priors, options, scaled(progress, forward_share, 1.0), "backward check"
            )
            forward_backward = np.linalg.norm(back - points, axis=1)
        else:
            forward_backward = np.full(len(points), np.nan)
    similarity = np.where(np.isfinite(similarity), similarity, np.nan)
    confidence = _confidence(forward_backward, similarity, options)
    return MatchResult(matched, similarity, confidence, forward_backward, confidence >= options.confidence_threshold)
