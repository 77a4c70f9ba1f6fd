"""Shared fixtures: paths to ../shared/data (tests skip cleanly without it) and small volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume, read_points, read_volume

DATA_DIR = Path(os.environ.get("MEDDIFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CHEST_DIR = DATA_DIR / "chestct_single_real"
DIRLAB_DIR = DATA_DIR / "dirlab4dct_landmarks"


def require(path: Path) -> Path:
    """Skip the calling test when a shared data file is absent."""
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def elastix_ct() -> Volume:
    return read_volume(require(CHEST_DIR / "elastix_lung_baseline_small" / "image.nii.gz"))


@pytest.fixture(scope="session")
def elastix_landmarks(elastix_ct: Volume):
    return read_points(require(CHEST_DIR / "elastix_lung_baseline_small" / "landmarks.csv"), elastix_ct.geometry)


@pytest.fixture(scope="session")
def pulmonary_ct() -> Volume:
    return read_volume(require(CHEST_DIR / "totalseg_pulmonary_crop" / "image.nii.gz"))


@pytest.fixture
def oblique_geometry() -> Geometry:
    """A small grid with anisotropic spacing and a rotated, flipped direction."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, -1.0]])
    return Geometry.create((12, 10, 8), (1.5, 0.8, 2.5), (-30.0, 12.5, 101.0), rotation)
