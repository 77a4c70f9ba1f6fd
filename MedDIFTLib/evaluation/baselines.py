"""The methods ``meddift eval`` compares: MedDIFT and the baselines users know.

Each method takes a loaded case (fixed and moving CT in HU, fixed points in LPS mm) and returns
the predicted moving points (LPS mm, the ITK direction: fixed point -> moving point) and, where
the method makes one, a dense displacement field on a grid of the fixed image (for folding
statistics):

- ``identity``: no registration (the initial error).
- ``mind`` / ``maisi``: MedDIFT point matching (:func:`MedDIFTLib.matching.match_points`, search
  radius 25 mm as ``meddift match``) with that backbone; no field.
- ``mind-field`` / ``maisi-field``: MedDIFT's dense field (:func:`MedDIFTLib.field.register`).
- ``bspline``: SimpleITK B-spline registration (multi-resolution, mean squares on clipped HU, L-BFGS)
  on grids of at least ``working_spacing_mm``. ITK's metric costs (samples x control points) per
  evaluation, so the defaults (24 mm control grid, 5000 random samples, 30 iterations per level)
  keep a 512x512x141 thorax to about a minute on two cores.
- ``convexadam``: ConvexAdam (Siebert, Hansen & Heinrich 2021; pip package ``convexAdam``, optional)
  with both images resampled to one isotropic grid over the fixed image.

A method is named by a spec ``NAME[:KEY=VALUE[,KEY=VALUE...]]`` (values in JSON, else text), e.g.
``mind:search_radius_mm=15`` or ``bspline:control_spacing_mm=12``; unknown names or keys are a
:class:`BadInputError` before any work.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.progress import ProgressFn, no_progress, scaled

MEDDIFT_SEARCH_RADIUS_MM = 25.0
CLIP_HU = (-1000.0, 1500.0)

BSPLINE_DEFAULTS: dict[str, Any] = {
    "control_spacing_mm": 24.0,
    "levels": 3,
    "iterations": 30,
    "samples": 5000,
    "working_spacing_mm": 2.0,
    "seed": 1,
    "metric": "meansquares",
}
BSPLINE_METRICS = ("meansquares", "correlation", "mattes")
CONVEXADAM_DEFAULTS: dict[str, Any] = {
    "working_spacing_mm": 2.0,
    "mind_r": 1,
    "mind_d": 2,
    "lambda_weight": 1.25,
    "grid_sp": 6,
    "disp_hw": 4,
    "selected_niter": 80,
    "selected_smooth": 0,
    "grid_sp_adam": 2,
    "ic": True,
}


@dataclass
class MethodOutput:
    """Predicted moving points (N, 3, LPS mm), an optional dense field on a grid of the fixed image
    (:class:`MedDIFTLib.field.DisplacementField`), and extra per-case numbers (e.g. reliable fraction)."""

    points_lps_mm: np.ndarray
    field: Any = None
    details: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A method name, its options, and the text it was given as (its label in tables)."""

    name: str
    options: dict
    label: str

    @property
    def slug(self) -> str:
        """The label as a file-name-safe string."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label.replace("=", "-")).strip("_")


METHOD_NAMES = ("identity", "mind", "maisi", "mind-field", "maisi-field", "bspline", "convexadam")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method(text: str) -> MethodSpec:
    """``NAME[:KEY=VALUE,...]`` -> :class:`MethodSpec`; checks the name and the option keys."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in METHOD_NAMES:
        raise BadInputError(f"unknown method {name!r}; choose from: {', '.join(METHOD_NAMES)}")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise BadInputError(f"method option {item!r} in {text!r} is not KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    accepted = accepted_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BadInputError(f"method {name!r} does not take option(s) {', '.join(unknown)}; "
                            f"it takes: {', '.join(accepted) or 'none'}")
    return MethodSpec(name, options, text.strip())


def _backbone(name: str) -> str:
    return name.split("-")[0]


def accepted_options(name: str) -> list[str]:
    """Option keys a method accepts (MatchOptions / FieldOptions fields and backbone options for MedDIFT)."""
    if name == "identity":
        return []
    if name == "bspline":
        return sorted(BSPLINE_DEFAULTS)
    if name == "convexadam":
        return sorted(CONVEXADAM_DEFAULTS)
    from ..core.options import FieldOptions, MatchOptions
    from ..features import backbone_spec

    backbone_keys = [key for key in backbone_spec(_backbone(name)).option_names() if key != "device"]
    search_keys = [f.name for f in fields(MatchOptions if name in ("mind", "maisi") else FieldOptions)]
    return sorted(set(backbone_keys) | set(search_keys))


def unavailable_reason(name: str) -> str | None:
    """Why a method cannot run on this machine (a missing optional package), or None."""
    if name == "convexadam" and importlib.util.find_spec("convexAdam") is None:
        return "ConvexAdam is not installed (pip install 'meddift[convexadam]' or pip install convexAdam)"
    return None


def _split_meddift_options(spec: MethodSpec) -> tuple[dict, dict]:
    from ..features import backbone_spec

    backbone_keys = set(backbone_spec(_backbone(spec.name)).option_names())
    backbone = {k: v for k, v in spec.options.items() if k in backbone_keys}
    search = {k: v for k, v in spec.options.items() if k not in backbone_keys}
    return backbone, search


def identity(fixed_points_lps_mm: np.ndarray) -> MethodOutput:
    """No registration: every fixed point stays where it is."""
    return MethodOutput(np.array(fixed_points_lps_mm, float).reshape(-1, 3))


def meddift(
    spec: MethodSpec,
    fixed,
    moving,
    fixed_points_lps_mm: np.ndarray,
    device: str = "cpu",
    weights_dir: str | None = None,
    progress: ProgressFn = no_progress,
) -> MethodOutput:
    """MedDIFT on ``fixed``/``moving`` (:class:`Volume`): point matching (``mind``, ``maisi``) or the dense
    field (``mind-field``, ``maisi-field``) with the spec's options."""
    from ..features import create_featurizer

    backbone_options, search_options = _split_meddift_options(spec)
    backbone_options.setdefault("device", device)
    if weights_dir and _backbone(spec.name) == "maisi":
        backbone_options.setdefault("weights_dir", weights_dir)
    featurizer = create_featurizer(_backbone(spec.name), **backbone_options)
    fixed_features = featurizer.extract(fixed, scaled(progress, 0.0, 0.3))
    moving_features = featurizer.extract(moving, scaled(progress, 0.3, 0.6))
    if spec.name.endswith("-field"):
        from ..field import FieldOptions, register

        options = FieldOptions(**search_options)
        displacement = register(fixed_features, moving_features, fixed, options, progress=scaled(progress, 0.6, 1.0))
        return MethodOutput(displacement.transform_points(fixed_points_lps_mm), displacement)
    from ..matching import MatchOptions, match_points

    options = MatchOptions(**{"search_radius_mm": MEDDIFT_SEARCH_RADIUS_MM, **search_options})
    result = match_points(fixed_features, moving_features, fixed_points_lps_mm, options=options,
                          progress=scaled(progress, 0.6, 1.0))
    return MethodOutput(result.points_lps_mm, None, {"reliable_fraction": float(np.mean(result.reliable)),
                                                     "mean_confidence": float(np.mean(result.confidence))})


def working_geometry(geometry: Geometry, spacing_mm: float, isotropic: bool = False) -> Geometry:
    """A grid over the same extent and orientation as ``geometry`` with voxels of at least ``spacing_mm``
    (``isotropic``: exactly ``max(spacing_mm, finest input spacing)`` along every axis)."""
    spacing = np.asarray(geometry.spacing_mm, float)
    if isotropic:
        target = np.full(3, max(spacing_mm, float(spacing.min())))
    else:
        target = np.maximum(spacing, spacing_mm)
    extent = spacing * (np.asarray(geometry.shape_ijk) - 1)
    shape = np.floor(extent / target + 1e-6).astype(int) + 1
    return Geometry.create(shape, target, geometry.origin_lps_mm, geometry.direction_matrix)


def _resampled_image(volume, target: Geometry):
    """``volume`` clipped to :data:`CLIP_HU`, smoothed where the target grid is coarser, resampled
    (trilinear) onto ``target``: a SimpleITK float32 image."""
    import SimpleITK as sitk

    image = sitk.Clamp(volume.to_sitk(sitk.sitkFloat32), sitk.sitkFloat32, *CLIP_HU)
    source_spacing = np.asarray(volume.geometry.spacing_mm)
    sigma = np.sqrt(np.maximum(np.asarray(target.spacing_mm) ** 2 - source_spacing**2, 0.0)) / 2.0
    if sigma.max() > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
    return sitk.Resample(image, [int(n) for n in target.shape_ijk], sitk.Transform(), sitk.sitkLinear,
                         target.origin_lps_mm, target.spacing_mm, target.direction, CLIP_HU[0], sitk.sitkFloat32)


def _field_from_transform(transform, geometry: Geometry):
    """The displacement field of a SimpleITK transform sampled on ``geometry`` (LPS mm)."""
    import SimpleITK as sitk

    from ..field import DisplacementField

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
    ``working_spacing_mm``. ``fixed_mask`` (a :class:`Volume`, non-zero inside) limits the metric. The
    field is sampled on the fixed working grid.
    """
    import SimpleITK as sitk

    settings = {**BSPLINE_DEFAULTS, **options}
    levels = int(settings["levels"])
    if levels < 1 or settings["control_spacing_mm"] <= 0 or settings["samples"] < 100 \
            or settings["metric"] not in BSPLINE_METRICS:
        raise BadInputError(f"bspline: levels >= 1, control_spacing_mm > 0, samples >= 100 and a metric in "
                            f"{', '.join(BSPLINE_METRICS)} are needed, got {settings}")
    fixed_grid = working_geometry(fixed.geometry, settings["working_spacing_mm"])
    fixed_image = _resampled_image(fixed, fixed_grid)
    moving_image = _resampled_image(moving, working_geometry(moving.geometry, settings["working_spacing_mm"]))
    extent = np.asarray(fixed_grid.spacing_mm) * (np.asarray(fixed_grid.shape_ijk) - 1)
    coarsest_mm = settings["control_spacing_mm"] * 2 ** (levels - 1)
    mesh = [max(1, int(round(e / coarsest_mm))) for e in extent]
    transform = sitk.BSplineTransformInitializer(fixed_image, mesh, 3)
    method = sitk.ImageRegistrationMethod()
    shrink_factors = [2 ** (levels - 1 - level) for level in range(levels)]
    if settings["metric"] == "meansquares":
        method.SetMetricAsMeanSquares()
    elif settings["metric"] == "correlation":
        method.SetMetricAsCorrelation()
    else:
        method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    level_voxels = [np.prod(np.ceil(np.asarray(fixed_image.GetSize()) / f)) for f in shrink_factors]
    method.SetMetricSamplingPercentagePerLevel([float(min(1.0, settings["samples"] / n)) for n in level_voxels],
                                               int(settings["seed"]))
    if fixed_mask is not None:
        mask = sitk.Resample(sitk.Cast(fixed_mask.to_sitk() != 0, sitk.sitkUInt8), fixed_image,
                             sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=int(settings["iterations"]),
                                deltaConvergenceTolerance=1e-6)
    method.SetShrinkFactorsPerLevel(shrink_factors)
    method.SetSmoothingSigmasPerLevel([float(max(fixed_grid.spacing_mm)) * (f - 1) / 2 for f in shrink_factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransformAsBSpline(transform, inPlace=True, scaleFactors=[2**level for level in range(levels)])
    state = {"level": 0}

    def on_level() -> None:
        state["level"] = method.GetCurrentLevel()

    def on_iteration() -> None:
        done = (state["level"] + method.GetOptimizerIteration() / max(int(settings["iterations"]), 1)) / levels
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
    """ConvexAdam (pip package ``convexAdam``) on both images resampled to one isotropic grid of
    ``working_spacing_mm`` over the fixed image; the other options go to ``convex_adam_pt``.

    ConvexAdam returns voxel displacements along the array axes of that grid, mapping a fixed voxel to
    its moving position (the ITK direction); they are turned into LPS mm on the grid.
    """
    if unavailable_reason("convexadam"):
        raise BadInputError(unavailable_reason("convexadam"))
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from ..field import DisplacementField

    settings = {**CONVEXADAM_DEFAULTS, **options}
    grid = working_geometry(fixed.geometry, float(settings.pop("working_spacing_mm")), isotropic=True)
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


def run_method(
    spec: MethodSpec,
    data,
    device: str = "cpu",
    weights_dir: str | None = None,
    progress: ProgressFn = no_progress,
) -> MethodOutput:
    """Run ``spec`` on a loaded case (:class:`MedDIFTLib.evaluation.datasets.CaseData` with volumes)."""
    points = data.fixed_points.points_lps_mm
    if spec.name == "identity":
        return identity(points)
    reason = unavailable_reason(spec.name)
    if reason:
        raise BadInputError(reason)
    if spec.name == "bspline":
        return bspline(data.fixed, data.moving, points, data.fixed_mask, progress, **spec.options)
    if spec.name == "convexadam":
        return convexadam(data.fixed, data.moving, points, device, progress, **spec.options)
    return meddift(spec, data.fixed, data.moving, points, device, weights_dir, progress)
