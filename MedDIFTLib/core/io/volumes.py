"""3D volumes with their geometry, read and written with SimpleITK.

Formats: anything SimpleITK reads by extension (NIfTI, NRRD, MHA/MHD, ...) and a DICOM
series folder. Voxel data are float32 in array order ``[k, j, i]``.

A reader proves it read the whole file before any voxel is allocated (:mod:`.verify`): the header
first, then the file's bytes against what the header declares (a gzip stream to its end, length
and CRC; a NIfTI's float voxels checked for NaN and infinity, which ITK's NIfTI reader turns into
zeros), and a DICOM series' slice positions for gaps. Every volume's geometry is checked
(:func:`check_geometry`): finite spacing in a plausible range, finite origin, orthonormal direction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import BadInputError
from ..geometry import Geometry
from .atomic import atomic_output, check_output_path
from .verify import check_dicom_slices, check_file_holds_voxels

SPACING_RANGE_MM = (1e-4, 1e4)
"""Voxel spacings a volume may have (0.1 micrometre to 10 m)."""
ORIGIN_LIMIT_MM = 1e9
DIRECTION_TOLERANCE = 1e-3
"""Largest departure of the direction matrix's D^T D from the identity (file rounding)."""


def check_geometry(spacing_mm, origin_lps_mm, direction, label: str) -> None:
    """Refuse a geometry no scan has: spacing not finite or outside :data:`SPACING_RANGE_MM`, an
    origin not finite (or beyond a million km), a direction that is not orthonormal (a scaled,
    sheared or zero matrix)."""
    spacing = np.asarray(spacing_mm, float)
    low, high = SPACING_RANGE_MM
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or not np.all((spacing >= low) & (spacing <= high)):
        raise BadInputError(f"{label}: voxel spacing {tuple(spacing.tolist())} mm must be finite, between {low:g} and "
                            f"{high:g} mm")
    origin = np.asarray(origin_lps_mm, float)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)) or np.abs(origin).max() > ORIGIN_LIMIT_MM:
        raise BadInputError(f"{label}: origin {tuple(origin.tolist())} mm must be finite")
    matrix = np.asarray(direction, float)
    if matrix.size != 9 or not np.all(np.isfinite(matrix)):
        raise BadInputError(f"{label}: the direction must be 9 finite numbers")
    matrix = matrix.reshape(3, 3)
    departure = float(np.abs(matrix.T @ matrix - np.eye(3)).max())
    if departure > DIRECTION_TOLERANCE:
        raise BadInputError(f"{label}: the direction matrix {matrix.round(4).tolist()} is not orthonormal (its axes "
                            "must be unit vectors at right angles; spacing belongs in the spacing)")


@dataclass(frozen=True)
class Volume:
    """Scalar voxel data ``[k, j, i]`` (float32) on a :class:`Geometry` in LPS mm.

    ``stored_dtype`` is the NumPy type the file held (e.g. ``int16`` for CT): a volume made from it
    (a warped image) is written back in that type, rounded, unless the writer is told otherwise.
    """

    voxels: np.ndarray
    geometry: Geometry
    name: str = ""
    stored_dtype: str | None = field(default=None, compare=False)
    _digest: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.voxels.shape != self.geometry.shape_kji:
            raise ValueError(f"voxel array {self.voxels.shape} does not fit grid {self.geometry.shape_kji}")

    @staticmethod
    def from_sitk(image: sitk.Image, name: str = "") -> Volume:
        """Convert a SimpleITK image; rejects non-3D, multi-component and non-finite images."""
        label = name or "image"
        if image.GetDimension() != 3:
            raise BadInputError(f"{label}: expected a 3D volume, got a {image.GetDimension()}D image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise BadInputError(
                f"{label}: expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        size = image.GetSize()
        if min(size) < 2:
            raise BadInputError(f"{label}: expected a 3D volume, got size {size} (a 2D slice?)")
        check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), label)
        voxels = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        if not np.isfinite(voxels).all():
            count = int((~np.isfinite(voxels)).sum())
            raise BadInputError(f"{label}: {count} voxels are NaN or infinite")
        geometry = Geometry.create(size, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        stored_dtype = sitk.GetArrayViewFromImage(image).dtype.name
        return Volume(np.ascontiguousarray(voxels), geometry, name, stored_dtype)

    def to_sitk(self, pixel_type: int | None = None) -> sitk.Image:
        """The volume as a SimpleITK image: of ``pixel_type`` when given, else of ``stored_dtype``
        (integer types rounded and clipped to their range), else float32."""
        if pixel_type is not None:
            return sitk.Cast(sitk_image(self.voxels, self.geometry), pixel_type)
        voxels = self.voxels
        if self.stored_dtype is not None and np.issubdtype(np.dtype(self.stored_dtype), np.integer):
            limits = np.iinfo(np.dtype(self.stored_dtype))
            voxels = np.clip(np.rint(voxels), limits.min, limits.max).astype(self.stored_dtype)
        elif self.stored_dtype is not None:
            voxels = voxels.astype(self.stored_dtype, copy=False)
        return sitk_image(voxels, self.geometry)

    def content_hash(self) -> str:
        """SHA-1 of voxel values and geometry: the feature-cache key of this volume."""
        if not self._digest:
            digest = hashlib.sha1(np.ascontiguousarray(self.voxels).tobytes())
            digest.update(repr(self.geometry).encode())
            self._digest.append(digest.hexdigest())
        return self._digest[0]


AIR_HU = -500.0
"""An image holding values at or below this is a CT in HU (air); MR signal never is."""


def is_ct_in_hu(volume: Volume) -> bool:
    """True for a CT in HU: ``volume`` holds air (a value at or below :data:`AIR_HU`)."""
    return bool(volume.voxels.min() <= AIR_HU)


def check_same_modality(reference: Volume, other: Volume) -> None:
    """Refuse ``other`` when it is a CT in HU and ``reference`` is not, or the other way round
    (:func:`is_ct_in_hu`): intensities learned on one cannot be read on the other."""
    if is_ct_in_hu(reference) != is_ct_in_hu(other):
        kinds = {True: "a CT in HU (it holds air)", False: f"not a CT in HU (no value at or below {AIR_HU:g})"}
        raise BadInputError(f"{other.name or 'follow-up'} is {kinds[is_ct_in_hu(other)]} but "
                            f"{reference.name or 'baseline'} is {kinds[is_ct_in_hu(reference)]}: "
                            "another modality? Every scan must be of the baseline's kind")


def check_overlap(fixed: Volume, moving: Volume) -> None:
    """Refuse two volumes whose world boxes (LPS mm) do not meet: the moving scan is not of this
    patient's same region (or its geometry is wrong), so no match could be right."""

    def box(volume) -> tuple:
        shape = np.asarray(volume.geometry.shape_ijk, float)
        corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1).T
        world = volume.geometry.ijk_to_lps(corners)
        return world.min(axis=0), world.max(axis=0)

    (fixed_low, fixed_high), (moving_low, moving_high) = box(fixed), box(moving)
    gap = np.maximum(np.maximum(fixed_low - moving_high, moving_low - fixed_high), 0.0)
    if (gap > 0).any():
        raise BadInputError(f"the volumes do not overlap in world space ({np.linalg.norm(gap):.0f} mm apart): "
                            f"{fixed.name or 'fixed'} and {moving.name or 'moving'} must show the same region "
                            "(LPS mm, as their headers place them)")


def sitk_image(voxels: np.ndarray, geometry: Geometry, is_vector: bool = False) -> sitk.Image:
    """A SimpleITK image of ``voxels`` (``[k, j, i]``, or ``[k, j, i, c]`` with ``is_vector``) on ``geometry``."""
    image = sitk.GetImageFromArray(voxels, isVector=is_vector)
    image.SetSpacing(geometry.spacing_mm)
    image.SetOrigin(geometry.origin_lps_mm)
    image.SetDirection(geometry.direction)
    return image


VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def check_volume_output(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a volume output that cannot be written (see :func:`check_output_path`)."""
    return check_output_path(path, VOLUME_EXTENSIONS)


def _first_line(error: Exception) -> str:
    """The reason in a SimpleITK/ITK error, without the paths into ITK's sources that it starts with."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Exception thrown", "/"))]
    reason = (reasons or ["unknown error"])[0]
    for prefix in ("sitk::ERROR: ", "itk::ERROR: "):
        reason = reason.removeprefix(prefix)
    if reason.startswith("Unable to determine ImageIO reader"):
        return "not an image format SimpleITK reads"
    return reason


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK warnings (printed on stderr) off while reading: failures become one clear error instead."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_folder(folder: Path) -> sitk.Image:
    if not any(entry.is_file() for entry in folder.iterdir()):
        raise BadInputError(f"{folder}: the folder is empty (expected a DICOM series)")
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise BadInputError(f"{folder}: folder holds no DICOM series")
    if len(series_ids) > 1:
        raise BadInputError(
            f"{folder}: folder holds {len(series_ids)} DICOM series; point to a folder with one series"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    check_dicom_slices(folder, files)
    reader.SetFileNames(files)
    return reader.Execute()


def _read_file(source: Path) -> sitk.Image:
    """The image of a single file, once its header's promise is checked against the file's bytes."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    reader.ReadImageInformation()
    check_file_holds_voxels(source, reader)
    return reader.Execute()


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar volume file or DICOM series folder, keeping its LPS geometry."""
    source = Path(path)
    if not source.exists():
        raise BadInputError(f"{source}: no such file or folder")
    try:
        with _quiet_itk():
            image = _read_dicom_folder(source) if source.is_dir() else _read_file(source)
    except RuntimeError as error:
        raise BadInputError(f"{source}: cannot read as an image ({_first_line(error)})") from None
    return Volume.from_sitk(image, name=source.name)


def write_volume(volume: Volume, path: str | os.PathLike, pixel_type: int | None = None) -> None:
    """Write ``volume`` atomically; the format follows the extension (one of :data:`VOLUME_EXTENSIONS`)."""
    target = check_volume_output(path)
    image = volume.to_sitk(pixel_type)
    with atomic_output(target) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as error:
            raise BadInputError(f"{target}: cannot write this volume ({_first_line(error)})") from None
