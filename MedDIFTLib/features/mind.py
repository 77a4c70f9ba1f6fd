"""MIND-SSC, the weight-free backbone (Heinrich et al., MICCAI 2013).

MIND-SSC compares image patches around the 12 pairs of voxels of the six-neighbourhood that lie
sqrt(2) apart: for a pair (a, b) the distance is the box-filtered squared difference
``(I(x+a) - I(x+b))^2``; the 12 distances are shifted by their minimum, divided by their mean
(the local variance estimate, floored at ``variance_floor``) and mapped through ``exp(-d)``.
Intensities are HU clipped to ``hu_window`` and scaled to [0, 1], so the floor is in those units
(squared). The descriptor is computed at a few scales (the image average-pooled by 1, 2, 4, ...),
one pyramid level each, so the fused similarity sees both fine detail and context. Each voxel's
12-vector is stored with unit L2 norm (matching compares descriptors by cosine), as float32 or, with
``dtype="float16"``, at half the memory.

Features see the anatomy in millimetres: on voxels that are not cubic (thick slices), the image is
first resampled onto an isotropic working grid (default: its finest spacing, but not finer than
``FINEST_WORKING_MM``, so a full-resolution CT of 2 mm slices is not doubled in memory;
``isotropic=False`` keeps the native grid), so the offsets, the boxes and the matching patches have
the same size in mm along every axis. The levels lie on that grid; matching maps them to the image by their
geometry, and results stay in the image's world mm.

The descriptor is local: a voxel's value depends only on the pooled image within
``dilation + patch_radius`` voxels of it (the border voxel repeated outside the volume). So a box
computed from the image around it equals the same box of the whole level, which lets the worker
compute features only where a search reads them (:meth:`MindFeaturizer.extract_regions`).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.devices import resolve_device
from ..core.errors import BadInputError
from ..core.geometry import FINEST_WORKING_MM
from ..core.io.volumes import Volume
from ..core.progress import ProgressFn, no_progress
from ..core.resample import WorkingImage
from .protocol import FeatureLevel, FeaturePyramid
from .regions import RegionFiller

ImageReader = Callable[[np.ndarray, np.ndarray], torch.Tensor]
"""``read(lo_kji, hi_kji)``: the voxels ``[lo, hi)`` of an image (e.g. a level's pooled image), float32."""

SIX_NEIGHBOURHOOD = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
SSC_PAIRS = [
    (a, b) for a, b in combinations(range(6), 2) if np.sum((SIX_NEIGHBOURHOOD[a] - SIX_NEIGHBOURHOOD[b]) ** 2) == 2
]
VARIANCE_FLOOR = 1e-5
WORKING_BLOCK = 4  # working-grid voxels per axis of a block of the kept working image (lazily filled levels)
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _shifted(padded: torch.Tensor, offset_kji: np.ndarray, pad: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """View of ``padded`` (D+2p, H+2p, W+2p) shifted by ``offset_kji`` voxels."""
    k, j, i = (pad + int(o) for o in offset_kji)
    return padded[k : k + shape[0], j : j + shape[1], i : i + shape[2]]


def _box_mean(values: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of ``values`` (K, J, I) over a (2r+1)^3 box, the border voxel repeated outside: one
    running sum per axis."""
    if radius == 0:
        return values.clone()
    summed = F.pad(values[None, None], (radius,) * 6, mode="replicate")[0, 0]
    for axis in range(3):
        length = summed.shape[axis] - 2 * radius
        total = summed.narrow(axis, 0, length).clone()
        for tap in range(1, 2 * radius + 1):
            total += summed.narrow(axis, tap, length)
        summed = total
    return summed.div_((2 * radius + 1) ** 3)


def mind_ssc(
    image: torch.Tensor, dilation: int = 1, patch_radius: int = 1, variance_floor: float = VARIANCE_FLOOR
) -> torch.Tensor:
    """MIND-SSC of a ``(K, J, I)`` image: a ``(12, K, J, I)`` tensor with values in (0, 1]."""
    shape = tuple(image.shape)
    pad = dilation
    padded = F.pad(image[None, None], (pad,) * 6, mode="replicate")[0, 0]
    offsets_kji = SIX_NEIGHBOURHOOD[:, ::-1] * dilation
    distances = torch.empty((len(SSC_PAIRS), *shape), dtype=image.dtype, device=image.device)
    for channel, (a, b) in enumerate(SSC_PAIRS):
        squared = (_shifted(padded, offsets_kji[a], pad, shape) - _shifted(padded, offsets_kji[b], pad, shape)) ** 2
        distances[channel] = _box_mean(squared, patch_radius)
        del squared
    minimum = distances[0].clone()
    for channel in distances[1:]:
        torch.minimum(minimum, channel, out=minimum)
    distances -= minimum
    variance = distances[0].clone()
    for channel in distances[1:]:
        variance += channel
    variance.div_(len(SSC_PAIRS)).clamp_(min=variance_floor)
    distances.div_(variance).neg_().exp_()
    return distances


def _unit_norm_(features: torch.Tensor) -> torch.Tensor:
    """``features`` (C, K, J, I) divided in place by each voxel's L2 norm over the channels."""
    norm = features[0] * features[0]
    for channel in features[1:]:
        norm.addcmul_(channel, channel)
    return features.div_(norm.sqrt_().clamp_(min=1e-12))


class MindFeaturizer:
    """MIND-SSC pyramid: level ``n`` is MIND-SSC of the image average-pooled by ``scales[n]``."""

    name = "mind"
    requires_weights = False

    def __init__(
        self,
        scales: tuple[int, ...] = (1, 2, 4),
        weights: tuple[float, ...] | None = None,
        dilation: int = 1,
        patch_radius: int = 1,
        match_patch_radius: int = 3,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        variance_floor: float = VARIANCE_FLOOR,
        dtype: str = "float16",
        isotropic: bool = True,
        spacing_mm: float | None = None,
        device: str = "cpu",
    ) -> None:
        if weights is not None and len(weights) != len(scales):
            raise BadInputError(f"MIND: {len(weights)} weights for {len(scales)} scales; give one weight per scale")
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or min(self.scales) < 1:
            raise BadInputError(f"MIND: scales must be pooling factors >= 1, got {list(scales)}")
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(self.scales)
        self.dilation = int(dilation)
        self.patch_radius = int(patch_radius)
        self.match_patch_radius = int(match_patch_radius)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        if not self.hu_window[0] < self.hu_window[1]:
            raise BadInputError(f"MIND: hu_window must be [low, high] with low < high, got {list(hu_window)}")
        self.variance_floor = float(variance_floor)
        if not self.variance_floor > 0:
            raise BadInputError(f"MIND: variance_floor must be > 0, got {variance_floor}")
        if dtype not in STORAGE_DTYPES:
            raise BadInputError(f"MIND: dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        self.dtype = str(dtype)
        self.isotropic = bool(isotropic)
        if spacing_mm is not None and not (np.isfinite(spacing_mm) and spacing_mm > 0):
            raise BadInputError(f"MIND: spacing_mm must be a positive number of mm (or null), got {spacing_mm!r}")
        self.spacing_mm = None if spacing_mm is None else float(spacing_mm)
        self.device = resolve_device(str(device))

    @property
    def config(self) -> dict[str, Any]:
        return {
            "scales": list(self.scales),
            "weights": list(self.weights),
            "dilation": self.dilation,
            "patch_radius": self.patch_radius,
            "match_patch_radius": self.match_patch_radius,
            "hu_window": list(self.hu_window),
            "variance_floor": self.variance_floor,
            "dtype": self.dtype,
            "isotropic": self.isotropic,
            "spacing_mm": self.spacing_mm,
        }

    def working_image(self, volume: Volume) -> WorkingImage:
        """The image the descriptors are computed on, read box by box: ``volume`` on its own grid, or
        on an isotropic grid of ``spacing_mm`` (default its finest spacing, at least
        ``FINEST_WORKING_MM``) when ``isotropic`` and its voxels are not cubic (or another spacing is
        asked for)."""
        geometry = volume.geometry
        if not self.isotropic or (self.spacing_mm is None and geometry.cubic):
            return WorkingImage(volume, geometry)
        grid = geometry.working_grid(self.spacing_mm or FINEST_WORKING_MM)
        if np.allclose(grid.spacing_mm, geometry.spacing_mm, rtol=0.05):
            return WorkingImage(volume, geometry)
        return WorkingImage(volume, grid)

    def _normalised(self, voxels: np.ndarray) -> torch.Tensor:
        """Working-grid ``voxels`` (HU) clipped to ``hu_window`` and scaled to [0, 1]: float32, on the device."""
        low, high = self.hu_window
        return (torch.from_numpy(np.clip(voxels, low, high)).to(self.device, torch.float32) - low) / (high - low)

    @staticmethod
    def _pool(normalised: torch.Tensor, scale: int) -> torch.Tensor:
        """``normalised`` (K, J, I) average-pooled by ``scale`` (itself when 1)."""
        return F.avg_pool3d(normalised[None, None], scale, stride=scale)[0, 0] if scale > 1 else normalised

    def _pooled(self, working: ImageReader, scale: int) -> ImageReader:
        """A reader of level voxels: the boxes of ``working`` (a reader of :meth:`_normalised` working
        voxels) that they cover, average-pooled by ``scale``."""

        def read(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
            return self._pool(working(np.asarray(lo_kji) * scale, np.asarray(hi_kji) * scale), scale)

        return read

    def _kept(self, image: WorkingImage) -> ImageReader:
        """A reader of the working image's :meth:`_normalised` voxels that keeps (float32, CPU) what it
        has computed, in blocks of ``WORKING_BLOCK`` voxels, so the boxes that overlap (every level's
        boxes around a point, their reach, the fill's steps) resample each working voxel once. A box
        reaching beyond the grid (a level pooled from more voxels than an axis has) is computed alone."""
        shape = np.asarray(image.geometry.shape_kji)
        values = torch.empty((1, *shape), dtype=torch.float32)
        filler = RegionFiller(lambda lo, hi: self._normalised(image.box(lo, hi))[None].cpu(), tuple(shape),
                              block=WORKING_BLOCK, around_filled=True)

        def kept(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
            lo, hi = np.asarray(lo_kji, int), np.asarray(hi_kji, int)
            if np.any(hi > shape):
                return self._normalised(image.box(lo, hi))
            filler.ensure(values, lo, hi, ahead=0)
            return values[(0, *(slice(int(a), int(b)) for a, b in zip(lo, hi)))].to(self.device)

        return kept

    def _box(self, pooled: ImageReader, shape_kji: tuple[int, int, int], lo_kji: np.ndarray,
             hi_kji: np.ndarray) -> torch.Tensor:
        """Unit-norm MIND-SSC ``(12, ...)`` of the box ``[lo, hi)`` of a level (``shape_kji``),
        computed from its pooled image (``pooled``) within the descriptor's reach of the box (CPU)."""
        reach = self.dilation + self.patch_radius
        first = np.maximum(np.asarray(lo_kji) - reach, 0)
        last = np.minimum(np.asarray(hi_kji) + reach, shape_kji)
        features = _unit_norm_(mind_ssc(pooled(first, last), self.dilation, self.patch_radius, self.variance_floor))
        inner = tuple(slice(int(a - f), int(b - f)) for a, b, f in zip(lo_kji, hi_kji, first))
        return features[(slice(None), *inner)].to("cpu", STORAGE_DTYPES[self.dtype])

    def _level(self, image: WorkingImage, n: int, features: torch.Tensor, filler: RegionFiller | None) -> FeatureLevel:
        scale = self.scales[n]
        geometry = image.geometry.downsampled(scale)
        return FeatureLevel(
            f"mind_1/{scale}", features, geometry, self.weights[n], self.match_patch_radius, True, filler
        )

    def extract(self, volume: Volume, progress: ProgressFn = no_progress) -> FeaturePyramid:
        """Every level of the whole volume; the working image is resampled once, for all levels
        (a box of it equals the same box of the whole, so each level reads the same values as alone)."""
        image = self.working_image(volume)
        shapes = [image.geometry.downsampled(scale).shape_kji for scale in self.scales]
        extent_kji = np.max([np.asarray(shape) * scale for shape, scale in zip(shapes, self.scales)], axis=0)
        working = self._normalised(image.box(np.zeros(3, int), extent_kji))

        def crop(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
            return working[tuple(slice(int(a), int(b)) for a, b in zip(lo_kji, hi_kji))]

        levels = []
        for n, (scale, shape) in enumerate(zip(self.scales, shapes)):
            progress("features", n / len(self.scales), f"MIND-SSC level {n + 1}/{len(self.scales)} (1/{scale})")
            features = self._box(self._pooled(crop, scale), shape, np.zeros(3, int), np.asarray(shape))
            levels.append(self._level(image, n, features, None))
        progress("features", 1.0, "MIND-SSC done")
        return FeaturePyramid(levels, volume.geometry, self.name, self.config)

    def extract_regions(self, volume: Volume) -> FeaturePyramid:
        """The pyramid of :meth:`extract`, computed box by box where it is read (see :mod:`.regions`).

        Each level is allocated full size, uninitialised, in pages of the system's base size (so
        a box touches, and costs, no more than the pages it writes). The levels read one kept working
        image (float32, allocated the same way, filled where read: :meth:`_kept`), let go of once every
        level is complete.
        """
        image = self.working_image(volume)
        working = self._kept(image)
        levels = []
        for n, scale in enumerate(self.scales):
            shape = image.geometry.downsampled(scale).shape_kji
            features = torch.empty((12, *shape), dtype=STORAGE_DTYPES[self.dtype])
            pooled = self._pooled(working, scale)

            def compute(lo_kji: np.ndarray, hi_kji: np.ndarray, pooled: ImageReader = pooled,
                        shape: tuple[int, int, int] = shape) -> torch.Tensor:
                return self._box(pooled, shape, lo_kji, hi_kji)

            levels.append(self._level(image, n, features, RegionFiller(compute, shape, scale)))
        return FeaturePyramid(levels, volume.geometry, self.name, self.config)
