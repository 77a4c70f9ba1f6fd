"""Proof that a volume file holds what its header declares, before any voxel is allocated.

- A file's declared voxel bytes (its header, read by SimpleITK without the voxels) must fit in
  the memory budget (:func:`~MedDIFTLib.core.budget.default_budget`), and in the file: an
  uncompressed NIfTI at least as long as its voxel offset plus its voxels; any single file no
  more than deflate's largest expansion (:data:`~MedDIFTLib.core.budget.DEFLATE_MAX_RATIO`) of its size.
- A ``.nii.gz`` is decompressed to its end (Python's :mod:`gzip` checks the stream's length and
  CRC-32): SimpleITK reads a truncated one as a volume whose missing part is zeros.
- A NIfTI of float voxels is scanned for NaN and infinity, which ITK's NIfTI reader turns into
  zeros (other formats keep them, and :meth:`~.volumes.Volume.from_sitk` refuses them).
- A DICOM series' slices must be evenly spaced along their normal: a missing slice or a mixed
  series is refused, naming the gap (SimpleITK would spread the gap over every slice).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..budget import DEFLATE_MAX_RATIO, default_budget, describe_bytes
from ..errors import BadInputError, OutOfMemoryError

CHUNK_BYTES = 1 << 20
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI datatype codes of real float voxels and their NumPy type (without byte order)."""
NIFTI_HEADER_SIZES = (348, 540)
SINGLE_FILE_ENDINGS = (".nii", ".nii.gz", ".nrrd", ".mha")
"""Formats whose voxels are in the file itself (not in a second file the header names)."""
SLICE_GAP_TOLERANCE = 0.01
"""Largest relative departure of a DICOM slice gap from the series' median gap."""
SLICE_GAP_TOLERANCE_MM = 0.01


def _ending(source: Path) -> str:
    name = source.name.lower()
    return next((ending for ending in sorted(SINGLE_FILE_ENDINGS, key=len, reverse=True) if name.endswith(ending)), "")


def declared_voxel_bytes(reader: sitk.ImageFileReader) -> int:
    """The bytes of voxel data a file's header declares (size x components x bytes per component)."""
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    item_bytes = sitk.GetArrayViewFromImage(one).itemsize
    return int(np.prod([int(n) for n in reader.GetSize()], dtype=object)) * reader.GetNumberOfComponents() * item_bytes


def check_file_holds_voxels(source: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse ``source`` (its header read into ``reader``) when it cannot hold, or does not hold,
    the voxels its header declares, or when they would not fit in this machine's memory."""
    declared = declared_voxel_bytes(reader)
    voxel_count = int(np.prod([int(n) for n in reader.GetSize()], dtype=object)) * reader.GetNumberOfComponents()
    needed = declared + 4 * voxel_count  # the file's type, then float32
    budget = default_budget()
    shape = "x".join(str(n) for n in reader.GetSize())
    if budget is not None and needed > budget.limit_bytes:
        raise OutOfMemoryError(f"{source}: its header declares {shape} voxels, which need about "
                               f"{describe_bytes(needed, budget.limit_bytes)} of memory to read, more than the "
                               f"{describe_bytes(budget.limit_bytes, needed)} of {budget.source}")
    ending = _ending(source)
    if not ending:
        return
    file_bytes = source.stat().st_size
    if declared > DEFLATE_MAX_RATIO * file_bytes:
        raise BadInputError(f"{source}: its header declares {shape} voxels ({describe_bytes(declared)}) but the file "
                            f"has only {file_bytes} bytes: it is truncated or its header is wrong")
    if ending in (".nii", ".nii.gz"):
        _check_nifti(source, reader, declared, compressed=ending == ".nii.gz")


def _meta_number(reader: sitk.ImageFileReader, key: str) -> float | None:
    try:
        return float(reader.GetMetaData(key))
    except (RuntimeError, ValueError):
        return None


def _check_nifti(source: Path, reader: sitk.ImageFileReader, declared: int, compressed: bool) -> None:
    """Read a NIfTI file to its end: the gzip stream's length and CRC, the bytes its header
    promises, and no NaN or infinite float voxel."""
    offset = int(_meta_number(reader, "vox_offset") or 0)
    float_type = NIFTI_FLOAT_TYPES.get(int(_meta_number(reader, "datatype") or 0))
    end = offset + declared
    if not compressed and source.stat().st_size < end:
        raise _truncated(source, source.stat().st_size - offset, declared)
    if not compressed and float_type is None:
        return
    scan = _FloatScan(offset, end, float_type) if float_type is not None else None
    length = 0
    try:
        with (gzip.open(source, "rb") if compressed else source.open("rb")) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                if scan is not None:
                    scan.feed(chunk, length)
                length += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise BadInputError(f"{source}: the compressed file is damaged or truncated ({error or type(error).__name__})"
                            ) from None
    if length < end:
        raise _truncated(source, length - offset, declared)
    if scan is not None and scan.non_finite:
        raise BadInputError(f"{source}: {scan.non_finite} voxels are NaN or infinite")


def _truncated(source: Path, present: int, declared: int) -> BadInputError:
    return BadInputError(f"{source}: the file is truncated: it holds {max(present, 0)} bytes of voxels where its "
                         f"header declares {declared}")


class _FloatScan:
    """Counts non-finite float voxels in the bytes ``[offset, end)`` of a stream fed chunk by chunk."""

    def __init__(self, offset: int, end: int, float_type: str) -> None:
        self.offset, self.end, self.float_type = offset, end, float_type
        self.order: str | None = None
        self.pending = b""
        self.non_finite = 0

    def feed(self, chunk: bytes, position: int) -> None:
        """Scan ``chunk``, which starts at byte ``position`` of the stream."""
        if self.order is None:
            self.order = _byte_order(chunk)
        start, stop = max(self.offset, position), min(self.end, position + len(chunk))
        if stop <= start:
            return
        data = self.pending + chunk[start - position : stop - position]
        dtype = np.dtype(self.order + self.float_type)
        usable = len(data) - len(data) % dtype.itemsize
        values = np.frombuffer(data, dtype=dtype, count=usable // dtype.itemsize)
        self.non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.pending = data[usable:]


def _byte_order(header: bytes) -> str:
    """``<`` or ``>``: the byte order in which a NIfTI header's first field (its size) reads right."""
    size = int.from_bytes(header[:4], "little") if len(header) >= 4 else 0
    return "<" if size in NIFTI_HEADER_SIZES else ">"


def _slice_geometry(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A DICOM file's Image Position (Patient) and slice normal; None when it lacks them."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        orientation = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return None
    if position.shape != (3,) or orientation.shape != (6,):
        return None
    return position, np.cross(orientation[:3], orientation[3:])


def check_dicom_slices(folder: Path, files: Sequence[str]) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal: a repeated
    position, a gap (a missing slice) or a change of slice spacing, each named with its slices."""
    if len(files) < 3:
        return
    found = [_slice_geometry(path) for path in files]
    if any(item is None for item in found):
        return
    normal = found[0][1]
    positions = np.sort([float(position @ normal) for position, _ in found])
    gaps = np.diff(positions)
    typical = float(np.median(gaps))
    if typical <= SLICE_GAP_TOLERANCE_MM:
        raise BadInputError(f"{folder}: the DICOM series has slices at the same position (a repeated slice or two "
                            "series in one folder)")
    uneven = np.flatnonzero(np.abs(gaps - typical) > SLICE_GAP_TOLERANCE * typical + SLICE_GAP_TOLERANCE_MM)
    if len(uneven):
        first = int(uneven[0])
        missing = round(gaps[first] / typical) - 1
        hint = f" ({missing} missing slice{'s' if missing > 1 else ''}?)" if missing >= 1 else ""
        raise BadInputError(
            f"{folder}: the DICOM series' slices are not evenly spaced: {len(uneven)} of its {len(gaps)} gaps differ "
            f"from {typical:.3g} mm, the first between slices {first + 1} and {first + 2} ({gaps[first]:.3g} mm)"
            f"{hint}; a volume needs one slice spacing"
        )
