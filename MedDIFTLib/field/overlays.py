"""QA overlays of a registration: per-voxel maps on the fixed grid that show where to trust it.

- ``confidence``: the engine's match confidence (0..1, :mod:`MedDIFTLib.matching.correspondences`)
  of a lattice of fixed nodes matched along the field (from identity without one), resampled
  trilinearly from the lattice to the fixed grid.
- ``jacobian``: the field's Jacobian determinant ``det(I + du/dx)`` (unitless; 1 keeps volume, below
  1 shrinks, at or below 0 folds), :func:`.displacement.jacobian_determinant`.
- ``magnitude``: the length of the field's displacement ``|u(x)|``, mm.

The worker's ``overlays`` request writes them as volumes and the Slicer module shows them
(:mod:`MedDIFTLib.slicer.overlays`).
"""

from __future__ import annotations

import numpy as np

from ..core.geometry import Geometry
from ..core.options import FieldLevel
from ..core.progress import ProgressFn, no_progress
from ..features.protocol import FeaturePyramid
from ..grid.displacement_field import DisplacementField
from ..grid.sampling import resample
from ..matching import match_lattice
from .displacement import jacobian_determinant

CONFIDENCE = "confidence"
JACOBIAN = "jacobian"
MAGNITUDE = "magnitude"
OVERLAY_NAMES = (CONFIDENCE, JACOBIAN, MAGNITUDE)


def qa_overlays(
    fixed_pyramid: FeaturePyramid,
    moving_pyramid: FeaturePyramid,
    lattice: FieldLevel,
    field: DisplacementField | None = None,
    progress: ProgressFn = no_progress,
) -> dict[str, np.ndarray]:
    """The QA overlays by name (module docstring), each ``[k, j, i]`` float32 on the fixed image's
    grid (``fixed_pyramid.image_geometry``).

    ``lattice`` gives the confidence lattice: its node spacing (mm), search radius around ``field``
    (mm), candidate step and aggregation box (:meth:`FieldLevel.match_options`; its smoothness is
    not used). ``field`` (ITK convention, any grid; resampled to the fixed grid when on another) adds
    ``jacobian`` and ``magnitude``; without it there is ``confidence`` only, matched from identity.
    """
    geometry = fixed_pyramid.image_geometry
    progress("overlays", 0.0, "matching the confidence lattice")
    matched = match_lattice(
        fixed_pyramid,
        moving_pyramid,
        lattice.spacing_mm,
        lattice.match_options(),
        field,
        lattice.aggregation_nodes,
        progress,
    )
    confidence = matched.on_grid(matched.matches.confidence)[None]
    overlays = {CONFIDENCE: resample(confidence, matched.grid, geometry)[0]}
    if field is not None:
        on_fixed = _on_grid(field, geometry)
        overlays[JACOBIAN] = jacobian_determinant(on_fixed)
        overlays[MAGNITUDE] = np.linalg.norm(on_fixed.displacement_lps_mm, axis=-1)
    return {name: np.asarray(values, np.float32) for name, values in overlays.items()}


def _on_grid(field: DisplacementField, geometry: Geometry) -> DisplacementField:
    """``field`` on ``geometry``: itself (as a copy) when already there, else trilinearly resampled."""
    if field.geometry.same_grid(geometry):
        values = field.as_tensor()
    else:
        values = resample(field.as_tensor(), field.geometry, geometry)
    return DisplacementField.from_tensor(values, geometry)
