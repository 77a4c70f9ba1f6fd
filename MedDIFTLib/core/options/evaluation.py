"""The evaluation's options: how a synthetic pair is made, and the dataset layouts it reads
(distances in mm).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Options, option


@dataclass(frozen=True)
class SimulationOptions(Options):
    """How a synthetic pair is made from a real CT (distances in mm)."""

    seed: int = option(0, minimum=0, help="motion and noise seed")
    motion: str = option("breathing", choices=("breathing", "dirlab1", "dirlab2"),
                         help="motion family: the parametric breathing model, or a thin-plate spline through the "
                         "real T00->T50 landmark displacements of DIR-Lab 4DCT case 1 or 2 mapped onto the CT's "
                         "lungs (needs ../shared/data/dirlab4dct_landmarks)")
    mean_motion_mm: float = option(7.0, minimum=0.0, help="mean motion at the points, mm (breathing motion only)")
    motion_scale: float = option(1.0, minimum=0.0, help="factor on the DIR-Lab displacements (DIR-Lab motions "
                                 "only; 2-3 reaches the motion of the harder 4DCT cases)")
    num_keypoints: int = option(200, minimum=1, help="automatic keypoints in the lungs (when no points are given)")
    noise_hu: float = option(20.0, minimum=0.0, help="Gaussian noise, HU")
    spacing_factor: float = option(1.1, above=0.0, help="moving voxel size relative to the CT")
    allow_folding: bool = option(False, help="keep a motion that folds (Jacobian determinant <= 0), which has "
                                 "no one-to-one ground truth")


DATASET_LAYOUTS = ("dirlab", "copdgene", "learn2reg", "manifest", "pairs")  # see MedDIFTLib.evaluation.datasets
