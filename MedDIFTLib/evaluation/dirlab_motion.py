"""A synthetic motion fitted to real DIR-Lab 4DCT landmark displacements (T00 end-inhale -> T50 end-exhale).

The 300 landmark pairs of a DIR-Lab case (``<data>/dirlab4dct_landmarks/caseN/caseN_T00_landmarks.csv`` and
``..._T50_landmarks.csv``: 0-based voxel indices x, y, z, header row) are placed on the target CT by the affine
map of the case's lung box (the bounding box of its T00 landmarks) onto the CT's lung box, axis by axis. DIR-Lab
index axes point to the patient's left (x, column), posterior (y, row) and inferior (z, slice), so z is flipped
into LPS. The displacements keep their size in mm (times ``motion_scale``) and a thin-plate spline through them
(smoothed, since the landmarks are integer voxels) defines the pull field ``v`` of
:mod:`MedDIFTLib.evaluation.simulate`: at the mapped T50 position ``y``, ``v(y) = T00 - T50``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.interpolate import RBFInterpolator

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from .raw import DIRLAB_4DCT

DIRLAB_MOTIONS = {"dirlab1": 1, "dirlab2": 2}
# DIR-Lab index axes (x, y, z) in LPS: left, posterior, inferior.
DIRLAB_AXIS_SIGNS = np.array([1.0, 1.0, -1.0])
SPLINE_SMOOTHING = 1.0


def data_folder() -> Path:
    """The shared data folder: ``$MEDDIFT_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("MEDDIFT_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def dirlab_landmarks_mm(case: int, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """T00 and T50 landmarks (N, 3) of DIR-Lab case ``case`` in mm along left, posterior, superior."""
    root = (folder or data_folder()) / "dirlab4dct_landmarks" / f"case{case}"
    if not root.is_dir():
        raise BadInputError(f"{root}: DIR-Lab landmark folder not found (a DIR-Lab motion needs it; set MEDDIFT_DATA)")
    geometry = DIRLAB_4DCT[case].geometry()
    phases = []
    for phase in ("T00", "T50"):
        path = root / f"case{case}_{phase}_landmarks.csv"
        try:
            ijk = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        except (OSError, ValueError) as error:
            raise BadInputError(f"{path}: not a DIR-Lab landmark table x,y,z ({error})") from None
        if ijk.shape[1] != 3:
            raise BadInputError(f"{path}: not a DIR-Lab landmark table x,y,z")
        phases.append(geometry.ijk_to_lps(ijk) * DIRLAB_AXIS_SIGNS)
    if len(phases[0]) != len(phases[1]):
        raise BadInputError(f"{root}: T00 and T50 hold different numbers of landmarks")
    return phases[0], phases[1]


def _box(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, high = points.min(axis=0), points.max(axis=0)
    return low, np.maximum(high - low, 1e-6)


def dirlab_motion(
    case: int, lung_points_lps_mm: np.ndarray, motion_scale: float = 1.0, folder: Path | None = None
) -> tuple[RBFInterpolator, np.ndarray, np.ndarray]:
    """Thin-plate spline pull field (LPS mm -> LPS mm) of DIR-Lab case ``case`` on a CT whose lung voxels
    are ``lung_points_lps_mm`` (M, 3). Returns (spline, mapped T50 positions, their pull displacements)."""
    inhale_mm, exhale_mm = dirlab_landmarks_mm(case, folder)
    source_low, source_size = _box(inhale_mm)
    target_low, target_size = _box(np.asarray(lung_points_lps_mm, float).reshape(-1, 3))
    positions = target_low + (exhale_mm - source_low) * (target_size / source_size)
    displacements = motion_scale * (inhale_mm - exhale_mm)
    spline = RBFInterpolator(positions, displacements, kernel="thin_plate_spline", smoothing=SPLINE_SMOOTHING)
    return spline, positions, displacements


def dirlab_pull_field(
    case: int, lungs_kji: np.ndarray, lung_geometry: Geometry, field_geometry: Geometry,
    motion_scale: float = 1.0, folder: Path | None = None,
) -> np.ndarray:
    """The DIR-Lab pull field [k, j, i, 3] (LPS mm, float32) on ``field_geometry``, mapped onto the lung
    voxels ``lungs_kji`` (a mask on ``lung_geometry``)."""
    lung_ijk = np.argwhere(lungs_kji)[:, ::-1].astype(float)
    if len(lung_ijk) == 0:
        raise BadInputError("no lung voxels to place the DIR-Lab motion on")
    spline, _, _ = dirlab_motion(case, lung_geometry.ijk_to_lps(lung_ijk), motion_scale, folder)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in field_geometry.shape_kji], indexing="ij")
    grid_lps = field_geometry.ijk_to_lps(np.stack([i, j, k], axis=-1).reshape(-1, 3))
    return spline(grid_lps).reshape(*field_geometry.shape_kji, 3).astype(np.float32)
