"""The one scorer: fused multi-level patch cosine of fixed descriptors against moving candidates.

A level's similarity between a fixed point ``x`` and a moving point ``y`` is the mean cosine over
the taps ``o`` of a patch of moving-level voxel offsets: ``mean_o <f(x + o), m(y + o)>`` with
L2-normalised descriptors. The taps lie every ``s`` voxels from ``-r`` to ``r`` along each axis
(``r`` = ``FeatureLevel.patch_radius`` or ``MatchOptions.patch_radius``, ``s`` =
``MatchOptions.patch_step``, :func:`.candidates.patch_taps`); r = 0 is the plain voxel cosine of
the paper. The fused similarity is the weighted mean over levels (weights normalised to sum 1).
This module scores the point layout; the lattice layout (:mod:`.lattice`) scores the same
quantity for a grid of fixed points, one shared shift at a time.

Two ways to score a level, both memory-bounded (nothing is ever upsampled to the full image):
- native (default): cosine at the level's own voxels inside a box around the window, then
  trilinear interpolation of that similarity map at the candidates;
- exact: trilinear interpolation of the features at the candidates, then cosine. This equals
  "upsample all channels to the image grid, then cosine" (the reference implementation).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.fft import next_fast_len

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.options import MatchOptions
from ..features.protocol import FeatureLevel, FeaturePyramid
from ..grid.sampling import interpolate
from ..grid.vectors import unit_vectors
from .candidates import CandidateLattice, patch_offsets_ijk, patch_taps
from .descriptors import sample_patches, unit_descriptors

NATIVE_SPAN = 2.5
"""Widest level voxel, in lattice steps, whose similarity map is interpolated at the candidates
(native scoring, :func:`_exact_plan`); coarser levels are scored exactly when none is this fine."""


def resolving_levels(levels: list[FeatureLevel], step_mm: float) -> list[int]:
    """Indices of the levels whose voxels are at least half of ``step_mm`` (finer ones would only
    alias on a lattice of that step); the coarsest level when none is."""
    chosen = [n for n, level in enumerate(levels) if min(level.geometry.spacing_mm) >= step_mm / 2 - 1e-6]
    return chosen or [int(np.argmax([np.prod(level.geometry.spacing_mm) for level in levels]))]


class Scorer:
    """Fused similarity of fixed descriptors against moving candidates, batch by batch.

    Holds the fusion plan (normalised level ``weights``, patch ``radii`` and tap ``steps``) that
    both layouts use.
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
        self.steps = [patch_taps(radius, options.patch_step)[0] for radius in self.radii]
        self.exact = options.exact
        self.budget_bytes = options.memory_budget_mb * 2**20

    def fixed_descriptors(self, points_lps_mm: np.ndarray) -> list[torch.Tensor]:
        """Per level, (B, n_taps, C) fixed descriptors at the moving level's patch taps."""
        descriptors = []
        levels = zip(self.fixed.levels, self.moving.levels, self.radii, self.steps)
        for fixed_level, moving_level, radius, step in levels:
            offsets_mm = patch_offsets_ijk(radius, step) @ moving_level.geometry.affine_ijk_to_lps[:3, :3].T
            positions = points_lps_mm[:, None, :] + offsets_mm[None]
            descriptors.append(sample_patches(fixed_level, positions))
        return descriptors

    def _image_to_level(self, level: FeatureLevel) -> tuple[np.ndarray, np.ndarray]:
        """The affine map of moving image voxels to ``level`` voxels (:func:`_level_affine`)."""
        return _level_affine(self.moving.image_geometry, level.geometry)

    @staticmethod
    def _lattice_key(lattice: CandidateLattice) -> tuple:
        return lattice.half.astype(np.int64).tobytes(), lattice.stride.astype(np.int64).tobytes()

    def _box_layout(self, level: FeatureLevel, lattice: CandidateLattice) -> tuple[np.ndarray, np.ndarray]:
        """Stride and half-count (ijk, level voxels) of the similarity samples for one lattice
        (:func:`_similarity_layout`)."""
        return _similarity_layout(self._image_to_level(level)[0].tobytes(), *self._lattice_key(lattice))

    def _exact_levels(self, lattice: CandidateLattice) -> list[bool]:
        """Which levels to score the exact way on this lattice (:func:`_exact_plan`)."""
        if self.exact:
            return [True] * len(self.moving.levels)
        maps = tuple(self._image_to_level(level)[0].tobytes() for level in self.moving.levels)
        return list(_exact_plan(maps, self._lattice_key(lattice)[1]))

    def batch_size(self, lattice: CandidateLattice, levels: list[int] | None = None) -> int:
        """Points per batch that keep one batch's working tensors within the memory budget when
        ``levels`` (default all) are scored on ``lattice``."""
        per_point = 0
        exact_levels = self._exact_levels(lattice)
        for n in range(len(self.moving.levels)) if levels is None else levels:
            level, radius, step, exact = self.moving.levels[n], self.radii[n], self.steps[n], exact_levels[n]
            patch = patch_taps(radius, step)[1] ** 3
            if exact:
                per_point = max(per_point, level.channels * lattice.size * patch * 4 * 2)
            else:
                stride, half = self._box_layout(level, lattice)
                box = int(np.prod(2 * (radius + stride * half) + 2))
                per_point = max(per_point, (level.channels * 2 + 2) * box * 4 + lattice.size * 16)
        return max(1, int(self.budget_bytes // max(per_point, 1)))

    def score(
        self,
        descriptors: list[torch.Tensor],
        centres_ijk: np.ndarray,
        lattice: CandidateLattice,
        levels: list[int] | None = None,
    ) -> torch.Tensor:
        """Fused similarity (B, Nc) of B fixed descriptors at their candidates: the ``lattice``
        offsets around each of the (B, 3) ``centres_ijk`` (moving image voxels), in the lattice's
        raster order. ``levels`` restricts the fusion to those level indices (weights
        renormalised; default all).
        """
        fused = None
        exact_levels = self._exact_levels(lattice)
        chosen = range(len(self.moving.levels)) if levels is None else levels
        total = sum(self.weights[n] for n in chosen)
        for n in chosen:
            level, descriptor, radius, step = self.moving.levels[n], descriptors[n], self.radii[n], self.steps[n]
            linear, offset = self._image_to_level(level)
            centres = centres_ijk @ linear.T + offset
            device = level.features.device
            offsets = _level_offsets(linear.tobytes(), *self._lattice_key(lattice), str(device))
            coords = torch.as_tensor(centres, dtype=torch.float32, device=device)[:, None, :] + offsets
            if exact_levels[n]:
                similarity = self._score_exact(level, descriptor, coords, radius, step)
            else:
                similarity = self._score_native(level, descriptor, coords, centres, lattice, radius, step)
            weight = self.weights[n] / total
            fused = weight * similarity if fused is None else fused + weight * similarity
        return fused

    @staticmethod
    def _score_exact(
        level: FeatureLevel, descriptor: torch.Tensor, coords: torch.Tensor, radius: int, step: int
    ) -> torch.Tensor:
        batch, count, _ = coords.shape
        offsets = torch.tensor(patch_offsets_ijk(radius, step).tolist(), dtype=coords.dtype, device=coords.device)
        samples = level.samples(coords, offsets).T
        samples = unit_vectors(samples.reshape(level.channels, batch, count, len(offsets)), 0)
        return torch.einsum("cbnd,bdc->bn", samples, descriptor) / len(offsets)

    def _score_native(
        self,
        level: FeatureLevel,
        descriptor: torch.Tensor,
        coords: torch.Tensor,
        centres_level_ijk: np.ndarray,
        lattice: CandidateLattice,
        radius: int,
        step: int,
    ) -> torch.Tensor:
        """Patch cosine on the level's own voxels (every ``stride``) in a box around each row's
        centre (``centres_level_ijk``, level voxels), interpolated at the candidates ``coords``."""
        device = level.features.device
        shape_ijk = level.geometry.shape_ijk
        stride, half = self._box_layout(level, lattice)
        centre = np.floor(centres_level_ijk + 1e-6).astype(int)
        first = centre - stride * half
        sizes = [2 * (radius + s * h) + 2 for s, h in zip(stride, half)]
        features = unit_descriptors(level, level.boxes(first - radius, sizes), dim=1)
        batch = features.shape[0]
        taps = patch_taps(radius, step)[1]
        kernels = descriptor.transpose(1, 2).reshape(batch, level.channels, taps, taps, taps)
        similarity = _correlate(features, kernels, step, stride[::-1]) / taps**3
        upper = torch.tensor(shape_ijk, dtype=coords.dtype, device=device) - 1
        origin = torch.as_tensor(first, dtype=coords.dtype, device=device)[:, None, :]
        step = torch.as_tensor(stride, dtype=coords.dtype, device=device)
        relative = (coords.clamp(min=torch.zeros_like(upper), max=upper) - origin) / step
        return interpolate(similarity[:, None], relative)[:, 0]


@functools.lru_cache(maxsize=256)
def _level_affine(image: Geometry, grid: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The map of ``image`` voxels to ``grid`` voxels: (3, 3) linear part and (3,) offset,
    ``grid_ijk = image_ijk @ linear.T + offset`` (read-only; kept, the search asks per batch)."""
    image_affine, grid_affine = image.affine_ijk_to_lps, grid.affine_ijk_to_lps
    linear = np.linalg.solve(grid_affine[:3, :3], image_affine[:3, :3])
    offset = np.linalg.solve(grid_affine[:3, :3], image_affine[:3, 3] - grid_affine[:3, 3])
    linear.setflags(write=False)
    offset.setflags(write=False)
    return linear, offset


@functools.lru_cache(maxsize=256)
def _level_offsets(image_to_level: bytes, half: bytes, stride: bytes, device: str) -> torch.Tensor:
    """(Nc, 3) float32 candidate offsets of a lattice (``half``, ``stride``: int64 ijk bytes) in the
    voxels of a level (``image_to_level``: the (3, 3) float64 map of image voxel steps to level
    voxels, as bytes), on ``device``. Kept and shared: never modify it."""
    lattice = CandidateLattice(np.frombuffer(half, dtype=np.int64), np.frombuffer(stride, dtype=np.int64), 0.0)
    linear = np.frombuffer(image_to_level).reshape(3, 3)
    return torch.as_tensor(lattice.offsets_ijk() @ linear.T, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=256)
def _exact_plan(image_to_levels: tuple[bytes, ...], stride: bytes) -> tuple[bool, ...]:
    """Per level (``image_to_levels``: each level's (3, 3) float64 map of image voxel steps to level
    voxels, as bytes), whether to score it the exact way on a lattice of ``stride`` (int64 ijk
    bytes). Kept: the search asks on every batch.

    Interpolating a similarity map cannot place a peak between voxels much wider than the
    lattice step. When some level is fine enough (voxels at most ``NATIVE_SPAN`` lattice steps:
    MIND's first level, also on an isotropic working grid somewhat coarser than the image's
    pixels), it localises the peak and coarser levels only add context, so all stay native.
    When none is (the diffusion levels: 1/4 to 1/16 of the grid), the coarse levels are scored
    exactly.
    """
    lattice_stride = np.frombuffer(stride, dtype=np.int64)
    coarse = []
    for linear in image_to_levels:
        step_in_level_voxels = np.linalg.norm(np.frombuffer(linear).reshape(3, 3) * lattice_stride[None, :], axis=0)
        coarse.append(bool(np.any(step_in_level_voxels < 1.0 / NATIVE_SPAN - 1e-6)))
    return tuple(coarse) if all(coarse) else (False,) * len(coarse)


@functools.lru_cache(maxsize=256)
def _similarity_layout(image_to_level: bytes, half: bytes, stride: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Stride and half-count (ijk, level voxels) of the similarity samples of a lattice (``half``,
    ``stride``: int64 ijk bytes) on a level (``image_to_level``: the (3, 3) float64 map of image
    voxel steps to level voxels, as bytes). Kept: the search asks on every batch.

    Where the lattice steps over several level voxels along an axis (and the axes agree), the
    level is scored only every ``stride`` voxels; ``half`` samples each side of the centre cover
    every candidate plus what interpolation reads.
    """
    linear = np.frombuffer(image_to_level).reshape(3, 3)
    lattice_half, lattice_stride = np.frombuffer(half, dtype=np.int64), np.frombuffer(stride, dtype=np.int64)
    extent = np.abs(linear) @ (lattice_half * lattice_stride)
    aligned = np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6)
    step = np.abs(np.diag(linear)) * lattice_stride
    samples_stride = np.maximum(1, np.floor(step + 1e-6)).astype(int) if aligned else np.ones(3, int)
    # The candidates lie within ``extent`` of the box centre's voxel plus a fraction in [0, 1);
    # at stride 1 the samples reach one voxel beyond +half, at coarser strides they do not.
    samples_half = np.ceil((extent + (samples_stride > 1) - 1e-6) / samples_stride).astype(int)
    return samples_stride, samples_half


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


def _correlate(inputs: torch.Tensor, kernels: torch.Tensor, dilation: int, stride_kji: np.ndarray) -> torch.Tensor:
    """Valid cross-correlation of each row's ``inputs`` (B, C, K, J, I) with its ``kernels``
    (B, C, t, t, t; taps ``dilation`` voxels apart), summed over channels and sampled every
    ``stride_kji``: what a grouped ``conv3d`` computes, by FFT (several times faster on the CPU
    for these small boxes, equal to float rounding). A length of at least the box keeps the
    valid part free of wrap-around; the product is taken in place of the inputs' spectra.
    """
    span = (kernels.shape[-1] - 1) * dilation + 1
    sizes = [_fft_length(n) for n in inputs.shape[2:]]
    spectra = torch.fft.rfftn(inputs, s=sizes, dim=(2, 3, 4))
    spectrum = spectra.mul_(_conjugate_kernel_spectra(kernels, dilation, sizes)).sum(dim=1)
    full = torch.fft.irfftn(spectrum, s=sizes, dim=(1, 2, 3))
    valid = [slice(0, int(n) - span + 1, int(s)) for n, s in zip(inputs.shape[2:], stride_kji)]
    return full[(slice(None), *valid)]
