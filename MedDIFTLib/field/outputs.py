"""What ``register`` leaves beside the field: fixed points carried through it, and its summary file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import PointSet, atomic_output
from ..core.io.points import UNRELIABLE_TAG
from ..grid.displacement_field import DisplacementField
from .displacement import jacobian_determinant


def summary_path(out_transform: str | os.PathLike) -> Path:
    """Where the run's summary goes: the transform's file name with ``.json`` added."""
    target = Path(out_transform)
    return target.with_name(target.name + ".json")


def write_summary(
    out_transform: str | os.PathLike, summary: dict, points: str | None, backbone: str, device: str,
    options: dict[str, Any],
) -> Path:
    """Write the run's summary (``summary`` of ``register_and_write`` with the points file, backbone, device
    and options as JSON) atomically to :func:`summary_path`; return that path."""
    target = summary_path(out_transform)
    record = {**summary, "points": points, "backbone": backbone, "device": device, "options": options}
    with atomic_output(target) as tmp:
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return target


def carried_points(field: DisplacementField, points: PointSet) -> PointSet:
    """``points`` pushed through ``field`` as a point set with the columns of ``meddift match``."""
    fixed = points.points_lps_mm
    geometry = field.geometry
    ijk = np.clip(np.round(geometry.lps_to_ijk(fixed)), 0, np.asarray(geometry.shape_ijk) - 1).astype(int)
    local = jacobian_determinant(field)[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    on_grid = geometry.contains_lps(fixed, margin_voxels=0.5)
    reliable = on_grid & (local > 0)
    descriptions = []
    for inside, determinant, ok in zip(on_grid, local, reliable):
        text = "carried through the field (no per-point confidence)"
        text += f"; Jacobian determinant {determinant:.2f}" if inside else "; outside the field's grid: not moved"
        descriptions.append(text if ok else f"{UNRELIABLE_TAG}; {text}")
    missing = np.full(len(points), np.nan)
    return PointSet(field.transform_points(fixed), points.labels, descriptions, unreliable=~reliable,
                    attributes={"confidence": missing, "similarity": missing, "forward_backward_mm": missing})
