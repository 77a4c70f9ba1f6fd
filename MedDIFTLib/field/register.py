"""From two feature pyramids to a dense displacement field, and the ``register`` outputs.

Pipeline (each step reads only the :class:`FeaturePyramid` contract, so any backbone works):

1. Matches: the correspondence engine's lattice layout (:func:`MedDIFTLib.matching.match_lattice`)
   matches every node of a regular lattice of the fixed image (``FieldLevel.spacing_mm``) within
   ``search_radius_mm`` of the field so far, with its forward-backward check and confidence, so
   the field and ``match`` rest on the same similarity.
2. Robust fit: a smooth field is fitted to those Correspondences inside the region (or a user mask),
   each weighted by its confidence and by a robust weight, so bad matches do not pull it (:mod:`.fit`).
3. Coarse to fine: a further level matches a finer lattice through the field so far (the moving
   descriptors are sampled through it) and the field is fitted again to its matches.
4. Instance optimisation on the descriptor similarity with a diffusion penalty (:mod:`.optimise`).
   The lattice gives the capture range (tens of mm) but answers limited by its step; the
   optimisation uses every node of the mask and refines them, so it is on by default.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.io.volumes import Volume, write_volume
from ..core.options import FieldLevel, FieldOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeaturePyramid
from ..grid.cells import cell_grid
from ..grid.displacement_field import DisplacementField
from ..grid.sampling import resample
from ..matching import match_lattice
from .displacement import (
    check_field_path,
    invert,
    jacobian_stats,
    warp_volume,
    write_field,
)
from .fit import robust_fit
from .optimise import instance_optimise
from .region import Region, automatic_region, region_from_mask

MIN_POINTS = 8


def register(
    fixed_pyramid: FeaturePyramid,
    moving_pyramid: FeaturePyramid,
    fixed: Volume | None = None,
    options: FieldOptions | None = None,
    mask: Volume | None = None,
    progress: ProgressFn = no_progress,
    initial: DisplacementField | None = None,
) -> DisplacementField:
    """Dense displacement field (ITK convention, fixed grid, LPS mm) from two feature pyramids.

    ``fixed`` (the fixed image) gives the automatic region (:mod:`.region`); ``mask`` (non-zero =
    inside, any grid) replaces it. Without either, the whole fixed grid is used. ``initial`` (any
    grid; default identity) is the field the first level searches around.
    """
    options = options or FieldOptions()
    if len(fixed_pyramid.levels) != len(moving_pyramid.levels):
        raise BadInputError("fixed and moving features come from different backbone configurations")
    geometry = fixed_pyramid.image_geometry
    if fixed is not None and not fixed.geometry.same_grid(geometry):
        raise BadInputError("the fixed volume and the fixed features are on different grids")
    if mask is not None:
        region = region_from_mask(mask)
    elif fixed is not None and options.automatic_region:
        region = automatic_region(fixed)
    else:
        region = Region.whole(geometry)
    param_grid = cell_grid(geometry, options.optimise_spacing_mm)
    level_count = len(options.levels)
    matching_share = 0.7 if options.optimise_iterations > 0 else 0.95
    fitted = initial
    with torch.no_grad():
        for index, level in enumerate(options.levels):
            report = scaled(progress, matching_share * index / level_count, matching_share * (index + 1) / level_count)
            lattice = match_lattice(
                fixed_pyramid,
                moving_pyramid,
                level.spacing_mm,
                level.match_options(),
                fitted,
                level.aggregation_nodes,
                scaled(report, 0.0, 0.8),
            )
            matches = lattice.matches
            inside = region.contains(matches.fixed_points_lps_mm)
            if int(inside.sum()) < MIN_POINTS:
                raise BadInputError(
                    f"only {int(inside.sum())} lattice nodes of {level.spacing_mm} mm fall inside the mask; "
                    "use a larger mask or a finer lattice"
                )
            report("fit", 0.8, f"level {index + 1}: fitting {int(inside.sum())} matches")
            fitted = robust_fit(
                lattice.displacement_field(),
                lattice.on_grid(np.where(inside, matches.confidence, 0.0)),
                level.smoothness_mm,
                options.break_gradient,
                options.robust_iterations,
            )
            report("fit", 1.0, f"level {index + 1} done")
    if fitted is None:
        nodes = torch.zeros((3, *param_grid.shape_kji))
    else:
        nodes = resample(fitted.as_tensor(), fitted.geometry, param_grid)
    if options.optimise_iterations > 0:
        nodes = instance_optimise(
            fixed_pyramid,
            moving_pyramid,
            nodes,
            param_grid,
            region.contains,
            options.optimise_iterations,
            options.optimise_regularisation,
            scaled(progress, matching_share, 0.97),
            break_gradient=options.break_gradient,
        )
    progress("field", 0.98, "dense field on the fixed grid")
    dense = resample(nodes, param_grid, geometry)
    progress("field", 1.0, "done")
    return DisplacementField.from_tensor(dense, geometry)


def register_and_write(
    fixed: Volume,
    moving: Volume,
    fixed_pyramid: FeaturePyramid,
    moving_pyramid: FeaturePyramid,
    out_transform: str | os.PathLike,
    out_inverse: str | os.PathLike | None = None,
    out_warped: str | os.PathLike | None = None,
    options: FieldOptions | None = None,
    progress: ProgressFn = no_progress,
    *,
    mask: Volume | None = None,
) -> dict:
    """Register, then write the field, its inverse and the warped moving image (each optional but
    the field). Every output is computed before any is written, and each is written atomically.

    Returns a JSON-serialisable summary: output paths, Jacobian statistics of the field,
    displacement magnitudes (mm) and seconds per step.
    """
    options = options or FieldOptions()
    check_field_path(out_transform)
    if out_inverse is not None:
        check_field_path(out_inverse)
    if not moving.geometry.same_grid(moving_pyramid.image_geometry):
        raise BadInputError("the moving volume and the moving features are on different grids")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    has_inverse, has_warped = out_inverse is not None, out_warped is not None
    register_share = 0.8 - 0.1 * has_inverse - 0.05 * has_warped
    displacement = register(
        fixed_pyramid, moving_pyramid, fixed, options, mask, scaled(progress, 0.0, register_share)
    )
    seconds["register"] = time.perf_counter() - start
    mark = time.perf_counter()
    progress("jacobian", register_share, "Jacobian determinant")
    stats = jacobian_stats(displacement)
    seconds["jacobian"] = time.perf_counter() - mark
    inverse = warped = None
    if has_inverse:
        mark = time.perf_counter()
        inverse = invert(
            displacement,
            moving.geometry,
            options.inverse_spacing_mm,
            progress=scaled(progress, register_share, register_share + 0.1),
        )
        seconds["inverse"] = time.perf_counter() - mark
    if has_warped:
        mark = time.perf_counter()
        warped = warp_volume(moving, displacement, progress=scaled(progress, 0.85, 0.9))
        seconds["warp"] = time.perf_counter() - mark
    mark = time.perf_counter()
    progress("write", 0.9, "writing outputs")
    write_field(displacement, out_transform)
    if inverse is not None:
        write_field(inverse, out_inverse)
    if warped is not None:
        write_volume(warped, out_warped)
    seconds["write"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start
    progress("write", 1.0, "done")
    magnitude = np.linalg.norm(displacement.displacement_lps_mm, axis=-1)
    return {
        "transform": str(out_transform),
        "inverse": None if out_inverse is None else str(out_inverse),
        "warped": None if out_warped is None else str(out_warped),
        "jacobian": stats,
        "displacement_mm": {"mean": float(magnitude.mean()), "max": float(magnitude.max())},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
    }


__all__ = [
    "FieldLevel",
    "FieldOptions",
    "Region",
    "automatic_region",
    "register",
    "register_and_write",
]
