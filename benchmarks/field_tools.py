"""Field tools, ours against SimpleITK's on the same field: Jacobian determinant and inversion.

The field is analytic and smooth (a sum of sines, largest displacement ``--amplitude-mm``) on an
oblique grid (rotated axes, anisotropic voxels), so the direction handling is part of the test:

- Jacobian determinant: ours (:func:`MedDIFTLib.field.jacobian_determinant`) and
  ``sitk.DisplacementFieldJacobianDeterminant`` against the analytic ``det(I + du/dx)``;
- inverse: ours (:func:`MedDIFTLib.field.invert`, on the full grid and on a 4 mm solve grid) and
  ``sitk.InvertDisplacementField``, ``sitk.IterativeInverseDisplacementField`` and
  ``sitk.InverseDisplacementField`` (a kernel spline through subsampled points; SimpleITK has no
  ``FixedPointInverseDisplacementField``), by the residual ``|v(y) + u(y + v(y))|`` (mm) at
  the grid's voxels away from the border whose image ``y + v(y)`` stays inside the grid.

Errors are over voxels at least ``MARGIN_VOXELS`` from the border; seconds are wall time with
``--threads`` threads. Prints a Markdown table and writes it with a JSON of the figures::

    python benchmarks/field_tools.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MARGIN_VOXELS = 4


def _grid(size: int, oblique: bool):
    from MedDIFTLib.core.geometry import Geometry

    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    half = angle / 2
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(half), -np.sin(half)], [0.0, np.sin(half), np.cos(half)]])
    direction = rotation @ tilt if oblique else np.eye(3)
    return Geometry.create((size, size - 8, size - 16), (1.6, 1.8, 2.5), (-80.0, 40.0, 100.0), direction)


def _analytic(points: np.ndarray, amplitude_mm: float, centre: np.ndarray):
    """Displacement (N, 3) and Jacobian du/dx (N, 3, 3) of a smooth field, LPS mm."""
    wave = np.array([[1.0, 0.4, -0.3], [-0.2, 1.0, 0.5], [0.3, -0.6, 1.0]]) * (2 * np.pi / 120.0)
    phase = np.array([0.3, 1.1, -0.7])
    mix = np.array([[0.6, 0.3, 0.1], [-0.2, 0.7, 0.3], [0.2, -0.3, 0.5]]) * amplitude_mm
    argument = (points - centre) @ wave.T + phase  # (N, 3)
    displacement = np.sin(argument) @ mix.T
    jacobian = np.einsum("ab,nb,bc->nac", mix, np.cos(argument), wave)
    return displacement, jacobian


def _to_sitk(field):
    from MedDIFTLib.field import to_sitk_image

    return to_sitk_image(field)


def _from_sitk(image, geometry):
    import SimpleITK as sitk

    from MedDIFTLib.grid.displacement_field import DisplacementField

    return DisplacementField(sitk.GetArrayFromImage(image).astype(np.float32), geometry)


def _on_grid(image, geometry):
    """``image`` given the grid's direction (the kernel-spline filter's output is axis-aligned)."""
    image.SetDirection(geometry.direction)
    return image


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def _measure(geometry, amplitude_mm: float, grid_name: str) -> list[dict]:
    """Every method's error and seconds on the analytic field on ``geometry``."""
    import SimpleITK as sitk

    from MedDIFTLib.field import invert, jacobian_determinant
    from MedDIFTLib.grid.displacement_field import DisplacementField
    from MedDIFTLib.grid.nodes import grid_points

    rows: list[dict] = []
    points = grid_points(geometry)
    centre = points.mean(axis=0)
    displacement, jacobian = _analytic(points, amplitude_mm, centre)
    field = DisplacementField(displacement.reshape(*geometry.shape_kji, 3).astype(np.float32), geometry)
    interior = np.zeros(geometry.shape_kji, bool)
    interior[(slice(MARGIN_VOXELS, -MARGIN_VOXELS),) * 3] = True
    interior = interior.ravel()
    truth = np.linalg.det(np.eye(3)[None] + jacobian)

    def jacobian_row(name, compute):
        determinant, seconds = _timed(compute)
        error = np.abs(np.asarray(determinant, float).ravel() - truth)[interior]
        rows.append({"grid": grid_name, "step": "jacobian determinant", "method": name,
                     "mean_error": float(error.mean()), "max_error": float(error.max()), "seconds": seconds})

    jacobian_row("ours", lambda: jacobian_determinant(field))
    jacobian_row("sitk.DisplacementFieldJacobianDeterminant",
                 lambda: sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(_to_sitk(field), True)))

    def inverse_row(name, compute):
        inverse, seconds = _timed(compute)
        v = inverse.displacement_lps_mm.reshape(-1, 3).astype(float)
        landing = geometry.lps_to_ijk(points + v)
        inside = np.all((landing >= 1) & (landing <= np.asarray(geometry.shape_ijk) - 2), axis=1) & interior
        residual = np.linalg.norm(v + (field.transform_points(points + v) - (points + v)), axis=1)[inside]
        rows.append({"grid": grid_name, "step": "inverse", "method": name,
                     "mean_error": float(residual.mean()), "max_error": float(residual.max()), "seconds": seconds})

    inverse_row("ours (full grid)", lambda: invert(field, geometry))
    inverse_row("ours (4 mm solve grid)", lambda: invert(field, geometry, 4.0))
    inverse_row("sitk.InvertDisplacementField",
                lambda: _from_sitk(sitk.InvertDisplacementField(_to_sitk(field), 30, 0.01, 0.001, True), geometry))
    inverse_row("sitk.IterativeInverseDisplacementField",
                lambda: _from_sitk(sitk.IterativeInverseDisplacementField(_to_sitk(field), 30, 0.0), geometry))
    inverse_row("sitk.InverseDisplacementField (kernel spline)",
                lambda: _from_sitk(_on_grid(sitk.InverseDisplacementField(
                    _to_sitk(field), geometry.shape_ijk, geometry.origin_lps_mm, geometry.spacing_mm, 16,
                ), geometry), geometry))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    parser.add_argument("--size", type=int, default=96, help="voxels along i (j and k a little fewer)")
    parser.add_argument("--amplitude-mm", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    rows = []
    for oblique in (True, False):
        rows += _measure(_grid(args.size, oblique), args.amplitude_mm, "oblique" if oblique else "axis-aligned")
    lines = [
        f"Field on a {args.size}-voxel grid (oblique and axis-aligned), amplitude {args.amplitude_mm} mm, "
        f"{args.threads} thread(s); errors over voxels {MARGIN_VOXELS}+ from the border.",
        "",
        "| grid | step | method | mean error | max error | seconds |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['grid']} | {row['step']} | {row['method']} | {row['mean_error']:.2e} "
                     f"| {row['max_error']:.2e} | {row['seconds']:.2f} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "field_tools.md").write_text(table + "\n", encoding="utf-8")
    summary = {"size": args.size, "amplitude_mm": args.amplitude_mm, "rows": rows}
    (out / "field_tools.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    results = Path(__file__).resolve().parent / "results" / "field_tools.json"  # the README's table
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"markdown": table, "figures": summary}, indent=1), encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
