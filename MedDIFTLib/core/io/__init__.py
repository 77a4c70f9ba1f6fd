"""Reading and writing volumes and point sets, keeping world geometry (LPS mm)."""

from .atomic import atomic_output, check_output_path, check_outputs_apart
from .points import PointSet, read_dirlab_points, read_points, write_points
from .volumes import (
    AIR_HU,
    VOLUME_EXTENSIONS,
    Volume,
    check_geometry,
    check_overlap,
    check_same_modality,
    check_volume_output,
    is_ct_in_hu,
    read_volume,
    sitk_image,
    write_volume,
)

__all__ = [
    "AIR_HU",
    "VOLUME_EXTENSIONS",
    "PointSet",
    "Volume",
    "atomic_output",
    "check_geometry",
    "check_overlap",
    "check_same_modality",
    "check_output_path",
    "check_outputs_apart",
    "check_volume_output",
    "is_ct_in_hu",
    "read_dirlab_points",
    "read_points",
    "read_volume",
    "sitk_image",
    "write_points",
    "write_volume",
]
