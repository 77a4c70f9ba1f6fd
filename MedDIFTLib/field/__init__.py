"""Dense displacement fields from feature matches: fit, refine, invert, warp, check and save;
the QA overlays of a registration (:mod:`MedDIFTLib.field.overlays`).

See :mod:`MedDIFTLib.field.register` for the method; the field itself is
:class:`MedDIFTLib.grid.displacement_field.DisplacementField`, whose module states its convention
(ITK: fixed grid, maps fixed points to moving points, LPS mm).
"""

from .displacement import (
    invert,
    jacobian_determinant,
    jacobian_stats,
    read_field,
    to_sitk_image,
    warp_volume,
    write_field,
)
from .outputs import carried_points, summary_path, write_summary
from .overlays import qa_overlays
from .region import Region, automatic_region, region_from_mask
from .register import FieldLevel, FieldOptions, register, register_and_write

__all__ = [
    "FieldLevel",
    "FieldOptions",
    "Region",
    "automatic_region",
    "carried_points",
    "invert",
    "jacobian_determinant",
    "jacobian_stats",
    "qa_overlays",
    "region_from_mask",
    "read_field",
    "register",
    "register_and_write",
    "summary_path",
    "to_sitk_image",
    "warp_volume",
    "write_field",
    "write_summary",
]
