"""The lesions of a baseline CT: a labelmap on the baseline grid (one positive integer label per
lesion) or a point file (one labelled point per lesion), read and checked before any work.

Refused with a one-line :class:`BadInputError`: a labelmap on another grid than the baseline, an
empty labelmap, non-integer or negative label values, a point outside the baseline volume. A lesion
touching the volume border is kept and flagged per lesion (``touches_border``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.io import PointSet, read_points, read_volume
from ..core.io.volumes import Volume

POINT_SUFFIXES = (".mrk.json", ".json", ".fcsv", ".csv", ".txt")
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Lesions:
    """Lesions on the baseline grid: ``labelmap`` ``[k, j, i]`` (int32, 0 = background), one
    ``label`` value, ``name`` and seed point (LPS mm) per lesion. ``seeds_lps_mm`` are the given
    points, or the labels' centroids; ``from_points`` says which."""

    labelmap: np.ndarray
    labels: list[int]
    names: list[str]
    seeds_lps_mm: np.ndarray
    from_points: bool = False
    colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)


def label_values(voxels: np.ndarray, what: str) -> np.ndarray:
    """``voxels`` as int32 labels; refuses non-integer, negative or all-zero values."""
    if not np.all(np.isfinite(voxels)) or not np.array_equal(voxels, np.round(voxels)):
        raise BadInputError(f"{what}: label values must be integers (is this an image rather than a labelmap?)")
    if voxels.min() < 0 or voxels.max() > np.iinfo(np.int32).max:
        raise BadInputError(f"{what}: label values must be non-negative integers")
    labels = voxels.astype(np.int32)
    if not labels.any():
        raise BadInputError(f"{what}: the labelmap is empty (no lesion has a label above 0)")
    return labels


def centres_kji(labelmap: np.ndarray, labels: list[int]) -> np.ndarray:
    """Centre of mass (continuous ``[k, j, i]``, (N, 3)) of each label of ``labelmap`` (``[k, j, i]``
    int, or bool with label 1), each read inside its bounding box; NaN where a label is absent."""
    boxes = ndimage.find_objects(labelmap.view(np.int8) if labelmap.dtype == bool else labelmap)
    centres = np.full((len(labels), 3), np.nan)
    for n, label in enumerate(labels):
        box = boxes[label - 1] if 0 < label <= len(boxes) else None
        if box is not None:
            centres[n] = np.argwhere(labelmap[box] == label).mean(axis=0) + [s.start for s in box]
    return centres


def centroids_lps_mm(labelmap: np.ndarray, labels: list[int], geometry) -> np.ndarray:
    """Centre of mass (LPS mm) of each label of ``labelmap`` (``[k, j, i]``; NaN where absent)."""
    return geometry.ijk_to_lps(centres_kji(labelmap, labels)[:, ::-1])


def touches_border(mask: np.ndarray) -> bool:
    """True when ``mask`` (``[k, j, i]``) has a voxel on a face of its grid."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def _segment_metadata(path: Path) -> tuple[dict[int, str], dict[int, tuple[float, float, float]]]:
    """Segment names and colours by label value from a Slicer ``.seg.nrrd`` header (empty otherwise)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    keys = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    names, colors = {}, {}
    for key, value in keys.items():
        found = re.fullmatch(r"Segment(\d+)_LabelValue", key)
        if not found:
            continue
        index, label = found.group(1), int(value)
        names[label] = keys.get(f"Segment{index}_Name", str(label))
        color = keys.get(f"Segment{index}_Color", "").split()
        if len(color) == 3:
            colors[label] = tuple(float(c) for c in color)
    return names, colors


def lesions_from_labelmap(labelmap: Volume, baseline: Volume, names: dict[int, str] | None = None,
                          colors: dict | None = None) -> Lesions:
    """Check ``labelmap`` against ``baseline`` and list its lesions (label values ascending)."""
    what = labelmap.name or "lesion labelmap"
    if not labelmap.geometry.same_grid(baseline.geometry):
        raise BadInputError(f"{what}: the labelmap is not on the baseline grid (size {labelmap.geometry.shape_ijk} "
                            f"vs {baseline.geometry.shape_ijk}, or another origin/spacing/direction)")
    values = label_values(labelmap.voxels, what)
    labels = [int(v) for v in np.unique(values) if v > 0]
    names = names or {}
    return Lesions(values, labels, [names.get(label, str(label)) for label in labels],
                   centroids_lps_mm(values, labels, baseline.geometry), colors=dict(colors or {}))


def lesions_from_points(points: PointSet, baseline: Volume) -> Lesions:
    """One lesion per point (label value = the point's label when all are distinct positive integers,
    else 1..N); the labelmap is left empty for :func:`MedDIFTLib.lesions.refine.segment_from_seed`."""
    seeds = np.asarray(points.points_lps_mm, float).reshape(-1, 3)
    outside = np.flatnonzero(~baseline.geometry.contains_lps(seeds))
    if len(outside):
        listed = ", ".join(points.labels[n] for n in outside[:10])
        raise BadInputError(f"{len(outside)} lesion point(s) lie outside the baseline volume: {listed}")
    numeric = [label.isdigit() and int(label) > 0 for label in points.labels]
    values = [int(label) for label in points.labels] if all(numeric) else list(range(1, len(seeds) + 1))
    if len(set(values)) != len(values):
        values = list(range(1, len(seeds) + 1))
    return Lesions(np.zeros(baseline.geometry.shape_kji, np.int32), values, list(points.labels), seeds,
                   from_points=True)


def read_lesions(path: str | os.PathLike, baseline: Volume) -> Lesions:
    """A labelmap (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ...) or a point file, checked against ``baseline``."""
    source = Path(path)
    name = source.name.lower()
    if name.endswith(POINT_SUFFIXES):
        return lesions_from_points(read_points(source, baseline.geometry), baseline)
    if not name.endswith(LABELMAP_SUFFIXES):
        raise BadInputError(f"{source}: lesions must be a labelmap ({', '.join(LABELMAP_SUFFIXES)}) "
                            f"or a point file ({', '.join(POINT_SUFFIXES)})")
    labelmap = read_volume(source)
    names, colors = _segment_metadata(source) if name.endswith(".seg.nrrd") else ({}, {})
    return lesions_from_labelmap(labelmap, baseline, names, colors)
