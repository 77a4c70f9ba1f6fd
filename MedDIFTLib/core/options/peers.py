"""The peers of ``meddift eval``: the B-spline and ConvexAdam baselines' settings (distances in mm)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Options, option

BSPLINE_METRICS = ("meansquares", "correlation", "mattes")


@dataclass(frozen=True)
class BSplineOptions(Options):
    """SimpleITK B-spline registration settings, the ``bspline`` baseline of ``meddift eval``
    (distances in mm)."""

    control_spacing_mm: float = option(24.0, above=0.0, help="control point spacing at the finest level, mm")
    levels: int = option(3, minimum=1, help="resolution levels (the control grid doubles per coarser level)")
    iterations: int = option(30, minimum=1, help="L-BFGS iterations per level")
    samples: int = option(5000, minimum=100, help="random metric samples per level")
    working_spacing_mm: float = option(2.0, above=0.0, help="images are resampled to voxels of at least this, mm")
    seed: int = option(1, minimum=0, help="seed of the metric sampling")
    metric: str = option("meansquares", choices=BSPLINE_METRICS, help="similarity metric")


@dataclass(frozen=True)
class ConvexAdamOptions(Options):
    """ConvexAdam settings, the ``convexadam`` baseline of ``meddift eval``: the working grid (mm)
    and the keywords of ``convex_adam_pt``."""

    working_spacing_mm: float = option(2.0, above=0.0, help="isotropic working grid for cubic voxels, mm "
                                       "(never finer than the fixed image)")
    thick_slices_at_finest: bool = option(True, help="where the voxels are not cubic (thick slices), work on an "
                                          "isotropic grid of the pair's finest spacing instead of working_spacing_mm")
    mind_r: int = option(1, minimum=0, help="MIND radius, voxels")
    mind_d: int = option(2, minimum=1, help="MIND dilation, voxels")
    lambda_weight: float = option(1.25, minimum=0.0, help="regularisation of the convex step")
    grid_sp: int = option(6, minimum=1, help="grid spacing of the convex step, voxels")
    disp_hw: int = option(4, minimum=1, help="displacement search half-width, grid steps")
    selected_niter: int = option(80, minimum=0, help="Adam iterations")
    selected_smooth: int = option(0, minimum=0, help="smoothing kernel of the result (0: none)")
    grid_sp_adam: int = option(2, minimum=1, help="grid spacing of the Adam step, voxels")
    ic: bool = option(True, help="inverse consistency")
