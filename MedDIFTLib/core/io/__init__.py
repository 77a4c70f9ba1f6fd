"""Reading and writing volumes and point sets, keeping world geometry (LPS mm)."""

from .atomic import atomic_output
from .points import PointSet, read_dirlab_points, read_points, write_points
from .volumes import Volume, read_volume, sitk_image, write_volume

__all__ = [
    "PointSet",
    "Volume",
    "atomic_output",
    "read_dirlab_points",
    "read_points",
    "read_volume",
    "sitk_image",
    "write_points",
    "write_volume",
]
