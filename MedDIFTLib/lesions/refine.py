"""Fit a lesion to the follow-up image around its matched centre, and segment a lesion from a seed point.

Method (one for both): a threshold learned from the lesion's own intensities, half-way between
the lesion's median HU and the median of a shell around it (its surroundings, lung parenchyma
for a lung nodule), so that the boundary sits at the middle of a soft edge whatever the lesion's
size. In the follow-up that threshold is averaged with the same half-way value measured there
(the voxels above it near the matched centre against a shell beyond the growth region), since the
two scans blur an edge differently (slice thickness, resampling); on generated pairs the average
beat either threshold alone.

The follow-up lesion grows from the correspondence engine's matched centre, not from the carried
labelmap: the match is more accurate than the field around a lesion (the field is smooth and is
fitted to the whole lung, so a carried lesion is shifted and shrunk or swollen by its errors, and
a region bounded by it cuts off growth, most on thick slices). The voxels above the threshold
within a sphere around the match (radius: the baseline lesion's equivalent radius scaled to
``largest_volume_factor`` in volume, plus ``growth_margin_mm``) and as near to the carried lesion
form candidates: the carried lesion only bounds where the lesion may be, so that a match that
went astray (a lesion gone, a low-confidence match) cannot claim another structure. The connected
component holding the matched centre (else the one overlapping the carried lesion most) is the
lesion, its holes filled. Work is done in a box around the sphere.

Where the image supports the lesion, its edge stops the growth: the voxels just outside the
refined lesion are below the threshold. Where it does not (a "lesion" that is not distinct from
its surroundings, a nodule that touches a structure as bright as itself), the lesion grows until
the sphere or the carried lesion's neighbourhood stops it, and the voxels just outside are above
the threshold. Their share of the lesion's outer surface (:attr:`Refinement.open_surface`) says
which. Refining lesions into the very scan they came from: 0 for 23 of 24 nodules generated in
two real lungs (``evaluation.synthetic_lesions.make_lesion_pair``), 0.43 for the 24th, which touches the
chest wall and swelled 1.9x; 0.28-0.40 for boxes of lung parenchyma (the elastix crop), which
"grew" 2.3-3.3x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.geometry import Geometry
from .inputs import centres_kji

SHELL_MM = 3.0
OPEN_SURFACE_LIMIT = 0.15
"""Share of a refined lesion's outer surface above its threshold beyond which the image did not
bound its growth (the lesion is flagged ``unsupported_growth``)."""


@dataclass(frozen=True)
class Refinement:
    """A lesion fitted to the follow-up: its ``mask`` (``[k, j, i]`` bool), the ``threshold_hu`` it
    was grown with, and ``open_surface``: the share of the voxels just outside it (6-neighbours)
    that are above that threshold, i.e. where only the growth limits stopped it (0 when empty)."""

    mask: np.ndarray
    threshold_hu: float
    open_surface: float


def _box(first_kji: np.ndarray, last_kji: np.ndarray, margin_kji: np.ndarray,
         shape_kji: tuple[int, ...]) -> tuple[slice, ...]:
    """The voxels ``first_kji`` .. ``last_kji`` (inclusive) grown by ``margin_kji`` voxels, clipped to a
    grid of ``shape_kji``."""
    low = np.maximum(np.asarray(first_kji) - margin_kji, 0)
    high = np.minimum(np.asarray(last_kji) + margin_kji + 1, shape_kji)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _spacing_kji(geometry: Geometry) -> np.ndarray:
    return np.asarray(geometry.spacing_mm, float)[::-1]


def _within(mask: np.ndarray, distance_mm: float, spacing_kji: np.ndarray) -> np.ndarray:
    """Voxels within ``distance_mm`` (world) of ``mask``."""
    return ndimage.distance_transform_edt(~mask, sampling=spacing_kji) <= distance_mm


def learned_threshold(mask: np.ndarray, image: np.ndarray, geometry: Geometry) -> float:
    """Half-way (HU) between the median inside ``mask`` and the median of a shell around it."""
    spacing = _spacing_kji(geometry)
    extent = ndimage.find_objects(mask.view(np.int8))[0]
    box = _box([e.start for e in extent], [e.stop - 1 for e in extent], np.ceil(2 * SHELL_MM / spacing).astype(int) + 1,
               mask.shape)
    inside = mask[box]
    shell = _within(inside, SHELL_MM, spacing) & ~_within(inside, 1.0, spacing)
    if not shell.any():
        shell = ~inside
    return 0.5 * (float(np.median(image[box][inside])) + float(np.median(image[box][shell])))


def _component(candidates: np.ndarray, seed_kji: np.ndarray | None, prefer: np.ndarray) -> np.ndarray:
    """The component of ``candidates`` holding ``seed_kji`` (else the one overlapping ``prefer``
    most), holes filled; empty when there is none."""
    components, count = ndimage.label(candidates)
    if count == 0:
        return np.zeros_like(candidates)
    chosen = 0
    if seed_kji is not None and np.all((seed_kji >= 0) & (seed_kji < candidates.shape)):
        chosen = int(components[tuple(seed_kji)])
    if chosen == 0:
        overlap = np.bincount(components[prefer], minlength=count + 1)
        overlap[0] = 0
        chosen = int(np.argmax(overlap)) if overlap.max() > 0 else 0
    if chosen == 0:
        return np.zeros_like(candidates)
    return ndimage.binary_fill_holes(components == chosen)


def equivalent_radius_mm(mask: np.ndarray, geometry: Geometry) -> float:
    """The radius (mm) of the sphere with the volume of ``mask``."""
    return float((3.0 * mask.sum() * np.prod(geometry.spacing_mm) / (4.0 * np.pi)) ** (1.0 / 3.0))


def refine_lesion(carried: np.ndarray, image: np.ndarray, geometry: Geometry, threshold_hu: float,
                  centre_lps_mm: np.ndarray | None, baseline_radius_mm: float, growth_margin_mm: float,
                  largest_volume_factor: float) -> np.ndarray:
    """The mask of :func:`fit_lesion` (same arguments)."""
    return fit_lesion(carried, image, geometry, threshold_hu, centre_lps_mm, baseline_radius_mm, growth_margin_mm,
                      largest_volume_factor).mask


def fit_lesion(carried: np.ndarray, image: np.ndarray, geometry: Geometry, threshold_hu: float,
               centre_lps_mm: np.ndarray | None, baseline_radius_mm: float, growth_margin_mm: float,
               largest_volume_factor: float) -> Refinement:
    """The lesion in ``image`` (HU, follow-up grid) grown from ``centre_lps_mm`` (the matched centre;
    ``None``: the carried lesion's centre of mass) within ``baseline_radius_mm`` times
    ``largest_volume_factor`` ** (1/3) plus ``growth_margin_mm``, and as near to ``carried`` (the
    carried lesion, ``[k, j, i]`` bool). A matched centre farther than that reach from the carried
    lesion's centre (match and field disagree by more than the lesion could have grown: the match
    may have found a neighbour) is not used; the carried centre is. Empty when nothing is carried."""
    if not carried.any():
        return Refinement(np.zeros_like(carried), threshold_hu, 0.0)
    spacing = _spacing_kji(geometry)
    reach_mm = baseline_radius_mm * largest_volume_factor ** (1.0 / 3.0) + growth_margin_mm
    centre_kji = centres_kji(carried, [1])[0]
    if centre_lps_mm is not None:
        matched_kji = geometry.lps_to_ijk(np.asarray(centre_lps_mm, float)[None])[0][::-1]
        if np.linalg.norm((matched_kji - centre_kji) * spacing) <= reach_mm:
            centre_kji = matched_kji
    seed = np.round(centre_kji).astype(int)
    seed_in_grid = np.clip(seed, 0, np.asarray(carried.shape) - 1)
    box = _box(seed_in_grid, seed_in_grid, np.ceil((reach_mm + SHELL_MM) / spacing).astype(int) + 1, carried.shape)
    low = np.asarray([s.start for s in box])
    offsets = np.stack(np.meshgrid(*[np.arange(s.stop - s.start) for s in box], indexing="ij"), axis=-1)
    distance_mm = np.linalg.norm((offsets - (centre_kji - low)) * spacing, axis=-1)
    values = image[box]
    near_carried = _within(carried[box], reach_mm, spacing) if carried[box].any() else np.zeros_like(carried[box])
    region = (distance_mm <= reach_mm) & near_carried
    core = (distance_mm <= 0.5 * baseline_radius_mm) & (values >= threshold_hu)
    outer = (distance_mm > reach_mm) & (distance_mm <= reach_mm + SHELL_MM)
    if core.any() and outer.any():
        followup_hu = 0.5 * (float(np.median(values[core])) + float(np.median(values[outer])))
        threshold_hu = 0.5 * (threshold_hu + followup_hu)
    above = values >= threshold_hu
    lesion = _component(region & above, seed - low, carried[box])
    refined = np.zeros_like(carried)
    refined[box] = lesion
    return Refinement(refined, threshold_hu, _open_surface(lesion, above))


def _open_surface(lesion: np.ndarray, above: np.ndarray) -> float:
    """The share of the voxels just outside ``lesion`` (6-neighbours) that are in ``above``."""
    outside = ndimage.binary_dilation(lesion) & ~lesion
    count = int(outside.sum())
    return float((outside & above).sum()) / count if count else 0.0


def segment_from_seed(image: np.ndarray, geometry: Geometry, seed_lps_mm: np.ndarray,
                      max_radius_mm: float) -> np.ndarray:
    """A lesion around ``seed_lps_mm``: threshold half-way between the seed's HU (median of its
    3x3x3 neighbourhood) and the darkest tenth of a ``max_radius_mm`` sphere, component of the
    seed within that sphere, holes filled; empty when the seed is below the threshold."""
    spacing = _spacing_kji(geometry)
    seed = np.round(geometry.lps_to_ijk(np.asarray(seed_lps_mm, float)[None])[0][::-1]).astype(int)
    seed = np.clip(seed, 0, np.asarray(image.shape) - 1)
    box = _box(seed, seed, np.ceil(max_radius_mm / spacing).astype(int) + 1, image.shape)
    local_seed = seed - [s.start for s in box]
    offsets = np.stack(np.meshgrid(*[np.arange(s.stop - s.start) for s in box], indexing="ij"), axis=-1)
    sphere = np.linalg.norm((offsets - local_seed) * spacing, axis=-1) <= max_radius_mm
    values = image[box]
    near = tuple(slice(max(c - 1, 0), c + 2) for c in local_seed)
    seed_hu = float(np.median(values[near]))
    background_hu = float(np.percentile(values[sphere], 10))
    candidates = sphere & (values >= 0.5 * (seed_hu + background_hu))
    mask = np.zeros(image.shape, bool)
    mask[box] = _component(candidates, local_seed, np.zeros_like(candidates))
    return mask
