"""The fused patch similarity: its one definition, and its two evaluations at moving candidates.

Definition. A level's similarity between a fixed point ``x`` and a moving point ``y`` is the mean
cosine over the taps ``o`` of a patch of moving-level voxel offsets: ``mean_o <f(x + o), m(y + o)>``
with the descriptors read trilinearly and L2-normalised. The taps lie every ``s`` voxels from ``-r``
to ``r`` along each axis (:class:`LevelPatch`: ``r`` = ``FeatureLevel.patch_radius`` or
``MatchOptions.patch_radius``, ``s`` = ``MatchOptions.patch_step``); r = 0 is the plain voxel cosine
of the paper. The fused similarity is the weighted mean over the levels taking part (weights
normalised to sum 1 over them, :meth:`PatchSimilarity.shares`). Every search and layout reads the
weights, patches and fixed descriptors from :class:`PatchSimilarity`.

Two evaluations at a batch of points' candidates, both memory-bounded (nothing is ever upsampled to
the full image), chosen per level on each candidate lattice by its :class:`ScoringPlan`:
- reference (``exact``): trilinear moving features at every candidate's taps, then cosine. This
  equals "upsample all channels to the image grid, then cosine" (the reference implementation).
- fast (default): the cosine at the level's own voxels (:func:`voxel_similarity`: the unit level
  correlated with the fixed patches, :func:`correlate`), then trilinear interpolation of that map at
  the candidates; equal to the reference at the level's voxels. The point layout correlates a box
  around each point's window, the dense search (:func:`.points.dense_candidates`) the whole level.

The lattice layout (:mod:`.lattice`) evaluates the fast form for candidate shifts shared by all
nodes, with the same patches, normalisation and weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len

from ..core.errors import BadInputError
from ..core.options import MatchOptions
from ..features.protocol import FeatureLevel, FeaturePyramid
from ..grid.sampling import index_map, interpolate
from ..grid.vectors import unit_vectors
from .candidates import CandidateLattice, raster_offsets
from .descriptors import sample_patches, unit_descriptors

NATIVE_SPAN = 2.5
"""Widest level voxel, in lattice steps, whose similarity map is interpolated at the candidates
(the fast evaluation, :meth:`PatchSimilarity.plan`); coarser levels are scored exactly when none is
this fine."""


def resolving_levels(levels: list[FeatureLevel], step_mm: float) -> list[int]:
    """Indices of the levels whose voxels are at least half of ``step_mm`` (finer ones would only
    alias on a lattice of that step); the coarsest level when none is."""
    chosen = [n for n, level in enumerate(levels) if min(level.geometry.spacing_mm) >= step_mm / 2 - 1e-6]
    return chosen or [int(np.argmax([np.prod(level.geometry.spacing_mm) for level in levels]))]


@dataclass(frozen=True)
class LevelPatch:
    """The taps of one level's patch: every ``step`` moving-level voxels from ``-radius`` to ``radius``
    along each axis, ``taps`` per axis (:meth:`of` keeps them symmetric about the centre)."""

    radius: int
    step: int
    taps: int

    @staticmethod
    def of(radius: int, step: int = 1) -> LevelPatch:
        """The patch of ``radius`` voxels with taps about ``step`` voxels apart: ``step`` is rounded
        down to a divisor of ``2 radius`` so that the taps stay symmetric about the centre."""
        span = 2 * int(radius)
        usable = max(1, min(int(step), span)) if span else 1
        while span and span % usable:
            usable -= 1
        return LevelPatch(int(radius), usable, span // usable + 1)

    @property
    def count(self) -> int:
        """Taps in the patch (``taps ** 3``)."""
        return self.taps**3

    def offsets_ijk(self) -> np.ndarray:
        """(count, 3) integer tap offsets in ``[k, j, i]`` raster order (i fastest); read-only, shared."""
        return _patch_offsets(self)

    def kernels(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Fixed patch descriptors (B, count, C) as correlation kernels (B, C, taps, taps, taps)."""
        batch, _, channels = descriptors.shape
        return descriptors.transpose(1, 2).reshape(batch, channels, self.taps, self.taps, self.taps)


@functools.lru_cache(maxsize=64)
def _patch_offsets(patch: LevelPatch) -> np.ndarray:
    steps = -patch.radius + patch.step * np.arange(patch.taps)
    return raster_offsets([steps, steps, steps])


@dataclass(frozen=True)
class LevelPlan:
    """How one moving level is scored on one candidate lattice: its ``share`` of the fusion, the map
    of image voxels to its voxels (``level_ijk = image_ijk @ linear.T + offset``), the lattice's
    offsets in its voxels (Nc, 3; float32 on its device), and whether it is scored the reference way
    (``exact``) or the fast way, then from similarity samples every ``map_stride`` level voxels,
    ``map_half`` of them each side of a window's centre (ijk)."""

    index: int
    share: float
    linear: np.ndarray
    offset: np.ndarray
    candidate_offsets: torch.Tensor
    exact: bool
    map_stride: np.ndarray
    map_half: np.ndarray


@dataclass(frozen=True)
class ScoringPlan:
    """How the candidates of one ``lattice`` are scored: one :class:`LevelPlan` per level taking part.
    Made once per lattice (:meth:`PatchSimilarity.plan`) and used for every batch of points."""

    lattice: CandidateLattice
    levels: tuple[LevelPlan, ...]


class PatchSimilarity:
    """The fused patch similarity (module docstring) of ``fixed`` descriptors against ``moving`` ones:
    normalised level ``weights``, one :class:`LevelPatch` per level, and its evaluations."""

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
        self.patches = [
            LevelPatch.of(options.patch_radius if options.patch_radius is not None else level.patch_radius,
                          options.patch_step)
            for level in moving.levels
        ]
        self.exact = options.exact
        self.budget_bytes = options.memory_budget_mb * 2**20

    def shares(self, levels: list[int]) -> list[float]:
        """The weights of ``levels`` renormalised to sum 1 over them (their shares of the fusion)."""
        total = sum(self.weights[n] for n in levels)
        return [self.weights[n] / total for n in levels]

    def fixed_descriptors(self, points_lps_mm: np.ndarray) -> list[torch.Tensor]:
        """Per level, (B, count, C) fixed descriptors at the moving level's patch taps around each point."""
        descriptors = []
        for fixed_level, moving_level, patch in zip(self.fixed.levels, self.moving.levels, self.patches):
            offsets_mm = patch.offsets_ijk() @ moving_level.geometry.affine_ijk_to_lps[:3, :3].T
            positions = points_lps_mm[:, None, :] + offsets_mm[None]
            descriptors.append(sample_patches(fixed_level, positions))
        return descriptors

    def plan(self, lattice: CandidateLattice, levels: list[int] | None = None) -> ScoringPlan:
        """How to score ``lattice`` on ``levels`` (default all).

        Interpolating a similarity map cannot place a peak between voxels much wider than the
        lattice step. When some level is fine enough (voxels at most ``NATIVE_SPAN`` lattice steps:
        MIND's first level, also on an isotropic working grid somewhat coarser than the image's
        pixels), it localises the peak and coarser levels only add context, so all are scored the
        fast way. When none is (the diffusion levels: 1/4 to 1/16 of the grid), the coarse levels
        are scored exactly; all are with ``MatchOptions.exact``.
        """
        chosen = list(range(len(self.moving.levels))) if levels is None else list(levels)
        maps = [index_map(level.geometry, self.moving.image_geometry) for level in self.moving.levels]
        coarse = [
            bool(np.any(np.linalg.norm(linear * lattice.stride[None, :], axis=0) < 1.0 / NATIVE_SPAN - 1e-6))
            for linear, _ in maps
        ]
        exact = [True] * len(coarse) if self.exact or all(coarse) else [False] * len(coarse)
        plans = []
        for n, share in zip(chosen, self.shares(chosen)):
            linear, offset = maps[n]
            device = self.moving.levels[n].features.device
            offsets = torch.as_tensor(lattice.offsets_ijk() @ linear.T, dtype=torch.float32, device=device)
            stride, half = _map_samples(linear, lattice)
            plans.append(LevelPlan(n, share, linear, offset, offsets, exact[n], stride, half))
        return ScoringPlan(lattice, tuple(plans))

    def batch_size(self, plan: ScoringPlan) -> int:
        """Points per batch that keep one batch's working tensors within the memory budget when
        scored by ``plan``."""
        per_point = 0
        for level_plan in plan.levels:
            level, patch = self.moving.levels[level_plan.index], self.patches[level_plan.index]
            if level_plan.exact:
                per_point = max(per_point, level.channels * plan.lattice.size * patch.count * 4 * 2)
            else:
                box = int(np.prod(2 * (patch.radius + level_plan.map_stride * level_plan.map_half) + 2))
                per_point = max(per_point, (level.channels * 2 + 2) * box * 4 + plan.lattice.size * 16)
        return max(1, int(self.budget_bytes // max(per_point, 1)))

    def score(self, descriptors: list[torch.Tensor], centres_ijk: np.ndarray, plan: ScoringPlan) -> torch.Tensor:
        """Fused similarity (B, Nc) of B fixed ``descriptors`` (:meth:`fixed_descriptors`) at their
        candidates: the plan's lattice offsets around each of the (B, 3) ``centres_ijk`` (moving image
        voxels), in the lattice's raster order."""
        fused = None
        for level_plan in plan.levels:
            n = level_plan.index
            level, descriptor, patch = self.moving.levels[n], descriptors[n], self.patches[n]
            centres = centres_ijk @ level_plan.linear.T + level_plan.offset
            device = level.features.device
            coords = torch.as_tensor(centres, dtype=torch.float32, device=device)[:, None, :]
            coords = coords + level_plan.candidate_offsets
            if level_plan.exact:
                similarity = exact_similarity(level, patch, descriptor, coords)
            else:
                similarity = _interpolated_similarity(level, patch, descriptor, coords, centres, level_plan)
            weighted = level_plan.share * similarity
            fused = weighted if fused is None else fused + weighted
        return fused


def exact_similarity(
    level: FeatureLevel, patch: LevelPatch, descriptors: torch.Tensor, coords: torch.Tensor
) -> torch.Tensor:
    """The reference evaluation: patch cosine (B, Nc) of B fixed patch ``descriptors`` (B, count, C)
    with the moving ``level`` read trilinearly at each patch around the (B, Nc, 3) ``coords`` (level
    voxels) and L2-normalised."""
    batch, count, _ = coords.shape
    offsets = torch.tensor(patch.offsets_ijk().tolist(), dtype=coords.dtype, device=coords.device)
    samples = level.samples(coords, offsets).T
    samples = unit_vectors(samples.reshape(level.channels, batch, count, patch.count), 0)
    return torch.einsum("cbnd,bdc->bn", samples, descriptors) / patch.count


def voxel_similarity(
    level: FeatureLevel,
    patch: LevelPatch,
    descriptors: torch.Tensor,
    first_ijk: np.ndarray,
    sizes_ijk: list[int],
    stride_ijk: np.ndarray,
) -> torch.Tensor:
    """The fast evaluation's map: patch cosine (B, K, J, I) of B fixed patch ``descriptors``
    (B, count, C) with the unit ``level`` at its own voxels, every ``stride_ijk`` voxels from
    ``first_ijk`` (one row per patch, or one row for all), over boxes of ``sizes_ijk`` voxels that
    include the patch's reach (the border voxel repeated outside the level)."""
    features = unit_descriptors(level, level.boxes(first_ijk - patch.radius, sizes_ijk), dim=1)
    kernels = patch.kernels(descriptors).to(features.dtype)
    return correlate(features, kernels, patch.step, np.asarray(stride_ijk)[::-1]) / patch.count


def _interpolated_similarity(
    level: FeatureLevel,
    patch: LevelPatch,
    descriptors: torch.Tensor,
    coords: torch.Tensor,
    centres_level_ijk: np.ndarray,
    level_plan: LevelPlan,
) -> torch.Tensor:
    """The fast evaluation at the candidates: :func:`voxel_similarity` in a box around each row's
    centre (``centres_level_ijk``, level voxels), interpolated at the candidates ``coords``."""
    stride, half = level_plan.map_stride, level_plan.map_half
    first = np.floor(centres_level_ijk + 1e-6).astype(int) - stride * half
    sizes = [2 * (patch.radius + s * h) + 2 for s, h in zip(stride, half)]
    similarity = voxel_similarity(level, patch, descriptors, first, sizes, stride)
    upper = torch.tensor(level.geometry.shape_ijk, dtype=coords.dtype, device=coords.device) - 1
    origin = torch.as_tensor(first, dtype=coords.dtype, device=coords.device)[:, None, :]
    step = torch.as_tensor(stride, dtype=coords.dtype, device=coords.device)
    relative = (coords.clamp(min=torch.zeros_like(upper), max=upper) - origin) / step
    return interpolate(similarity[:, None], relative)[:, 0]


def _map_samples(linear: np.ndarray, lattice: CandidateLattice) -> tuple[np.ndarray, np.ndarray]:
    """Stride and half-count (ijk, level voxels) of the similarity samples of ``lattice`` on a level
    (``linear``: the (3, 3) map of image voxel steps to level voxels).

    Where the lattice steps over several level voxels along an axis (and the axes agree), the
    level is scored only every ``stride`` voxels; ``half`` samples each side of the centre cover
    every candidate plus what interpolation reads.
    """
    extent = np.abs(linear) @ (lattice.half * lattice.stride)
    aligned = np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6)
    step = np.abs(np.diag(linear)) * lattice.stride
    samples_stride = np.maximum(1, np.floor(step + 1e-6)).astype(int) if aligned else np.ones(3, int)
    # The candidates lie within ``extent`` of the box centre's voxel plus a fraction in [0, 1);
    # at stride 1 the samples reach one voxel beyond +half, at coarser strides they do not.
    samples_half = np.ceil((extent + (samples_stride > 1) - 1e-6) / samples_stride).astype(int)
    return samples_stride, samples_half


def correlate(inputs: torch.Tensor, kernels: torch.Tensor, dilation: int, stride_kji: np.ndarray) -> torch.Tensor:
    """Valid cross-correlation (B, K', J', I') of ``inputs`` (B or 1, C, K, J, I) with ``kernels``
    (B, C, t, t, t; taps ``dilation`` voxels apart), summed over channels and sampled every
    ``stride_kji``: each row's box with its own kernels, or one volume with every kernel. One
    volume goes to one ``conv3d`` with the kernels as output channels; a box per row goes by FFT
    (:func:`_correlate_boxes`, several times faster on the CPU for small boxes, equal to float rounding).
    """
    if len(inputs) == 1 and len(kernels) > 1:
        return F.conv3d(inputs, kernels, dilation=dilation, stride=tuple(int(s) for s in stride_kji))[0]
    return _correlate_boxes(inputs, kernels, dilation, stride_kji)


def _fft_length(n: int) -> int:
    """An FFT length >= ``n`` that the CPU FFT handles fast: ``n`` itself when its prime factors
    are all at most 13 (padding costs more than such factors do), else the next 5-smooth length."""
    rest = int(n)
    for prime in (2, 3, 5, 7, 11, 13):
        while rest % prime == 0:
            rest //= prime
    return int(n) if rest == 1 else next_fast_len(int(n), real=True)


@functools.lru_cache(maxsize=64)
def _conjugate_dft(length: int, taps: int, dilation: int, half: bool, device: str) -> torch.Tensor:
    """(F, taps) complex64: ``exp(+2 pi i f a dilation / length)`` for the frequencies ``f`` of a
    length ``length`` (``length // 2 + 1`` of them when ``half``, as ``rfft`` keeps) and the taps
    ``a``: the conjugate DFT of taps ``dilation`` voxels apart. Kept (the search asks per batch)."""
    frequencies = length // 2 + 1 if half else length
    phase = (2 * np.pi / length) * np.outer(np.arange(frequencies), np.arange(taps) * dilation)
    return torch.as_tensor(np.exp(1j * phase), dtype=torch.complex64, device=device)


def _conjugate_kernel_spectra(kernels: torch.Tensor, dilation: int, sizes: list[int]) -> torch.Tensor:
    """Complex conjugates of the spectra (B, C, K, J, I // 2 + 1) of the kernels (B, C, t, t, t;
    taps ``dilation`` voxels apart) zero padded to ``sizes`` (kji), as ``rfftn`` gives them: one
    small DFT matrix per axis (a kernel is much smaller than the box it is padded to)."""
    batch, channels, taps = kernels.shape[0], kernels.shape[1], kernels.shape[-1]
    device = str(kernels.device)
    along_k, along_j, along_i = (
        _conjugate_dft(n, taps, dilation, half, device) for n, half in zip(sizes, (False, False, True))
    )
    spectra = torch.matmul(kernels.to(along_i.dtype), along_i.T)  # (B, C, t, t, I // 2 + 1)
    spectra = torch.matmul(along_j, spectra)  # (B, C, t, J, I // 2 + 1)
    return torch.matmul(along_k, spectra.reshape(batch, channels, taps, -1)).reshape(batch, channels, *sizes[:2], -1)


def _correlate_boxes(
    inputs: torch.Tensor, kernels: torch.Tensor, dilation: int, stride_kji: np.ndarray
) -> torch.Tensor:
    """:func:`correlate` of each row's box by FFT. A length of at least the box keeps the valid part
    free of wrap-around; the product is taken in place of the inputs' spectra."""
    span = (kernels.shape[-1] - 1) * dilation + 1
    sizes = [_fft_length(n) for n in inputs.shape[2:]]
    spectra = torch.fft.rfftn(inputs, s=sizes, dim=(2, 3, 4))
    spectrum = spectra.mul_(_conjugate_kernel_spectra(kernels, dilation, sizes)).sum(dim=1)
    full = torch.fft.irfftn(spectrum, s=sizes, dim=(1, 2, 3))
    valid = [slice(0, int(n) - span + 1, int(s)) for n, s in zip(inputs.shape[2:], stride_kji)]
    return full[(slice(None), *valid)]
