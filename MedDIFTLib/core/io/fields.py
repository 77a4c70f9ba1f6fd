"""Displacement field files read without torch, for a client that uploads a field (a float32
``[k, j, i, 3]`` array of LPS mm vectors on its grid); :mod:`MedDIFTLib.field.displacement` reads
and writes them for the library. Formats: a vector image (``.nii.gz``, ``.nii``, ``.nrrd``,
``.mha``) or an ITK ``DisplacementFieldTransform`` (``.h5``, ``.hdf5``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import BadInputError
from ..geometry import Geometry

FIELD_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
FIELD_TRANSFORM_SUFFIXES = (".h5", ".hdf5")


def field_suffix(path: str | os.PathLike) -> str:
    """The format ending of a field file; :class:`BadInputError` for any other."""
    name = Path(path).name.lower()
    for suffix in FIELD_IMAGE_SUFFIXES + FIELD_TRANSFORM_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise BadInputError(
        f"{path}: unknown displacement field format; use one of "
        + ", ".join(FIELD_IMAGE_SUFFIXES + FIELD_TRANSFORM_SUFFIXES)
    )


def read_field_file(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """The displacement ``[k, j, i, 3]`` (float32, LPS mm) of a field file and its grid."""
    source = Path(path)
    if not source.is_file():
        raise BadInputError(f"{source}: no such file")
    suffix = field_suffix(source)
    try:
        if suffix in FIELD_TRANSFORM_SUFFIXES:
            transform = sitk.ReadTransform(str(source))
            if transform.GetName() == "CompositeTransform":
                transform = sitk.CompositeTransform(transform).GetNthTransform(0)
            image = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
        else:
            image = sitk.ReadImage(str(source))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unknown error"
        raise BadInputError(f"{source}: not a displacement field ({first_line})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
        raise BadInputError(f"{source}: a displacement field needs 3 components per voxel in 3D")
    geometry = Geometry.create(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return sitk.GetArrayFromImage(image).astype(np.float32), geometry
