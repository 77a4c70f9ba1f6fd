"""The baselines ``meddift eval`` compares MedDIFT with, each with typed, range-checked options
(:class:`~MedDIFTLib.core.options.BSplineOptions`, :class:`~MedDIFTLib.core.options.ConvexAdamOptions`).

Each baseline takes the fixed and moving CT (:class:`Volume`, HU) and the fixed points (LPS mm) and
returns a :class:`MethodOutput`: the predicted moving points (LPS mm, the ITK direction: fixed point
-> moving point) and the dense displacement field it made, on a grid of the fixed image (for folding
statistics):

- ``bspline``: SimpleITK B-spline registration (multi-resolution, mean squares on clipped HU, L-BFGS)
  on grids of at least ``working_spacing_mm``. ITK's metric costs (samples x control points) per
  evaluation, so the defaults use a coarse control grid and a few thousand random samples.
- ``convexadam``: ConvexAdam (Siebert, Hansen & Heinrich 2021; pip package ``convexAdam``, optional)
  with both images resampled to one isotropic grid over the fixed image, run as its users run it well:
  where the voxels are not cubic (thick slices) the grid has the finest spacing of the pair, else
  ``working_spacing_mm`` (:func:`convexadam_spacing_mm`, the one place that rule lives).

Both resample the images with :func:`MedDIFTLib.core.resample.resample_volume` after clipping to
:data:`CLIP_HU` (a no-op on MR signal); outside an image they take its lowest clipped value (air in
CT, no signal in MRI).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.options import BSplineOptions, ConvexAdamOptions, parse_options
from ..core.progress import ProgressFn, no_progress

CLIP_HU = (-1000.0, 1500.0)

BASELINE_OPTIONS: dict[str, type] = {"bspline": BSplineOptions, "convexadam": ConvexAdamOptions}


@dataclass
class MethodOutput:
    """Predicted moving points (N, 3, LPS mm), an optional dense field on a grid of the fixed image
    (:class:`MedDIFTLib.field.DisplacementField`), an optional confidence per point in [0, 1], and
    extra per-case numbers (e.g. reliable fraction)."""

    points_lps_mm: np.ndarray
    field: Any = None
    details: dict[str, float] = dataclasses.field(default_factory=dict)
    confidence: np.ndarray | None = None


def unavailable_reason(name: str) -> str | None:
    """Why a method cannot run on this machine (a missing optional package), or None."""
    if name == "convexadam" and importlib.util.find_spec("convexAdam") is None:
        return "ConvexAdam is not installed (pip install 'meddift[convexadam]' or pip install convexAdam)"
    return None


def convexadam_spacing_mm(
    fixed: Geometry, moving: Geometry, working_spacing_mm: float = ConvexAdamOptions.working_spacing_mm,
    thick_slices_at_finest: bool = ConvexAdamOptions.thick_slices_at_finest,
) -> float:
    """The spacing (mm) of ConvexAdam's isotropic working grid for a pair of image grids.

    Where either image's voxels are not cubic (:attr:`Geometry.cubic`, e.g. MRI of 1.37 x 1.37 x 4 mm)
    and ``thick_slices_at_finest``: the finest spacing of the pair, so the in-plane detail is kept
    (1.37 mm there). Otherwise ``working_spacing_mm``, or the pair's finest spacing where that is
    coarser. The grid covers the fixed image and is never finer than its finest spacing
    (:meth:`Geometry.working_grid`).
    """
    finest = float(min(min(fixed.spacing_mm), min(moving.spacing_mm)))
    thick_slices = not (fixed.cubic and moving.cubic)
    if thick_slices and thick_slices_at_finest:
        return finest
    return max(float(working_spacing_mm), finest)


def _resampled_image(volume, target: Geometry):
    """``volume`` clipped to :data:`CLIP_HU` and resampled onto ``target``
    (:func:`MedDIFTLib.core.resample.resample_volume`; outside the image its lowest clipped value):
    a SimpleITK float32 image."""
    from ..core.io.volumes import Volume
    from ..core.resample import resample_volume

    clipped = Volume(np.clip(volume.voxels, *CLIP_HU), volume.geometry, volume.name)
    return resample_volume(clipped, target, outside_value=float(clipped.voxels.min())).to_sitk()


def _field_from_transform(transform, geometry: Geometry):
    """The displacement field of a SimpleITK transform sampled on ``geometry`` (LPS mm)."""
    import SimpleITK as sitk

    from ..grid.displacement_field import DisplacementField

    image = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, [int(n) for n in geometry.shape_ijk],
                                              geometry.origin_lps_mm, geometry.spacing_mm, geometry.direction)
    return DisplacementField(sitk.GetArrayFromImage(image).astype(np.float32), geometry)


def bspline(
    fixed,
    moving,
    fixed_points_lps_mm: np.ndarray,
    fixed_mask=None,
    progress: ProgressFn = no_progress,
    **options: Any,
) -> MethodOutput:
    """SimpleITK B-spline registration of ``moving`` to ``fixed`` (:class:`Volume`, HU).

    Multi-resolution (``levels``; the control grid doubles per level to ``control_spacing_mm`` at the
    finest), ``metric`` (``meansquares``, ``correlation`` or ``mattes`` mutual information, 32 bins) of HU
    clipped to :data:`CLIP_HU` on ``samples`` random voxels per level (``seed``), L-BFGS with at most
    ``iterations`` per level, both images smoothed and resampled to voxels of at least
    ``working_spacing_mm`` (:class:`BSplineOptions`). ``fixed_mask`` (a :class:`Volume`, non-zero
    inside) limits the metric. The field is sampled on the fixed working grid.
    """
    import SimpleITK as sitk

    settings = parse_options(BSplineOptions, options, "bspline")
    levels = settings.levels
    fixed_grid = fixed.geometry.working_grid(settings.working_spacing_mm, isotropic=False)
    fixed_image = _resampled_image(fixed, fixed_grid)
    moving_image = _resampled_image(moving, moving.geometry.working_grid(settings.working_spacing_mm, isotropic=False))
    extent = np.asarray(fixed_grid.spacing_mm) * (np.asarray(fixed_grid.shape_ijk) - 1)
    coarsest_mm = settings.control_spacing_mm * 2 ** (levels - 1)
    mesh = [max(1, int(round(e / coarsest_mm))) for e in extent]
    transform = sitk.BSplineTransformInitializer(fixed_image, mesh, 3)
    method = sitk.ImageRegistrationMethod()
    shrink_factors = [2 ** (levels - 1 - level) for level in range(levels)]
    if settings.metric == "meansquares":
        method.SetMetricAsMeanSquares()
    elif settings.metric == "correlation":
        method.SetMetricAsCorrelation()
    else:
        method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    level_voxels = [np.prod(np.ceil(np.asarray(fixed_image.GetSize()) / f)) for f in shrink_factors]
    method.SetMetricSamplingPercentagePerLevel([float(min(1.0, settings.samples / n)) for n in level_voxels],
                                               settings.seed)
    if fixed_mask is not None:
        mask = sitk.Resample(sitk.Cast(fixed_mask.to_sitk() != 0, sitk.sitkUInt8), fixed_image,
                             sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=settings.iterations,
                                deltaConvergenceTolerance=1e-6)
    method.SetShrinkFactorsPerLevel(shrink_factors)
    method.SetSmoothingSigmasPerLevel([float(max(fixed_grid.spacing_mm)) * (f - 1) / 2 for f in shrink_factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransformAsBSpline(transform, inPlace=True, scaleFactors=[2**level for level in range(levels)])
    state = {"level": 0}

    def on_level() -> None:
        state["level"] = method.GetCurrentLevel()

    def on_iteration() -> None:
        done = (state["level"] + method.GetOptimizerIteration() / max(settings.iterations, 1)) / levels
        progress("bspline", min(done, 1.0), f"level {state['level'] + 1}/{levels}")

    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    method.Execute(fixed_image, moving_image)
    points = np.array([transform.TransformPoint([float(v) for v in p]) for p in fixed_points_lps_mm], float)
    return MethodOutput(points.reshape(-1, 3), _field_from_transform(transform, fixed_grid),
                        {"metric": float(method.GetMetricValue())})


def convexadam(
    fixed,
    moving,
    fixed_points_lps_mm: np.ndarray,
    device: str = "cpu",
    progress: ProgressFn = no_progress,
    **options: Any,
) -> MethodOutput:
    """ConvexAdam (pip package ``convexAdam``) on both images resampled to one isotropic grid over the
    fixed image, of :func:`convexadam_spacing_mm` (``working_spacing_mm``, or the pair's finest spacing where
    the voxels are not cubic); the other :class:`ConvexAdamOptions` go to ``convex_adam_pt``.

    ConvexAdam returns voxel displacements along the array axes of that grid, mapping a fixed voxel to
    its moving position (the ITK direction); they are turned into LPS mm on the grid.
    """
    if unavailable_reason("convexadam"):
        raise BadInputError(unavailable_reason("convexadam"))
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from ..grid.displacement_field import DisplacementField

    settings = dataclasses.asdict(parse_options(ConvexAdamOptions, options, "convexadam"))
    spacing_mm = convexadam_spacing_mm(fixed.geometry, moving.geometry, settings.pop("working_spacing_mm"),
                                       settings.pop("thick_slices_at_finest"))
    grid = fixed.geometry.working_grid(spacing_mm)
    progress("convexadam", 0.0, "resampling")
    import SimpleITK as sitk

    fixed_array = sitk.GetArrayFromImage(_resampled_image(fixed, grid))
    moving_array = sitk.GetArrayFromImage(_resampled_image(moving, grid))
    progress("convexadam", 0.1, "optimising")
    torch_device = torch.device(device)
    displacement_kji = convex_adam_pt(torch.from_numpy(fixed_array), torch.from_numpy(moving_array),
                                      dtype=torch.float16 if torch_device.type == "cuda" else torch.float32,
                                      device=torch_device, verbose=False, **settings)
    steps_ijk = np.asarray(displacement_kji, np.float64)[..., ::-1]
    axes = grid.direction_matrix * np.asarray(grid.spacing_mm)[None, :]
    field_lps = (steps_ijk @ axes.T).astype(np.float32)
    displacement = DisplacementField(field_lps, grid)
    progress("convexadam", 1.0, "done")
    return MethodOutput(displacement.transform_points(fixed_points_lps_mm), displacement)
