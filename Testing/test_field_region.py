"""Where the field is fitted (``MedDIFTLib.field.region``): the scanned object without the empty
background at the border, for any modality and field of view; lungs of a crop stay inside."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA_DIR, require

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.io import Volume, read_points, read_volume
from MedDIFTLib.evaluation.simulate import forstner_keypoints, lung_mask, make_synthetic_pair, phantom_ct
from MedDIFTLib.field import automatic_region, region_from_mask

LIVER_PAIRS = DATA_DIR / "liver4dmri_real_pairs"


def _voxel_centres(volume: Volume, mask: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask)
    return volume.geometry.ijk_to_lps(kji[:, ::-1].astype(float))


def test_phantom_body_and_lungs_in_air_outside():
    """A chest phantom in air: body and lungs (air-dark, but with vessels) inside, the air around out."""
    phantom = phantom_ct()
    region = automatic_region(phantom)
    lungs = lung_mask(phantom)
    assert lungs.any()
    assert region.contains(_voxel_centres(phantom, lungs)).all()
    corner = np.zeros(phantom.geometry.shape_kji, bool)
    corner[:, :4, :4] = True  # air outside the elliptic body
    assert not region.contains(_voxel_centres(phantom, corner)).any()
    assert 0.3 < region.fraction < 0.9


def test_lungs_touching_the_border_of_a_crop_stay_inside():
    """The same phantom cropped through a lung: the lung reaches the border and stays in the region
    (the old body mask filled holes slice by slice and lost it)."""
    phantom = phantom_ct()
    crop = (slice(None), slice(None), slice(20, None))  # cut through the left lung along i
    geometry = phantom.geometry
    origin = geometry.ijk_to_lps(np.array([[20.0, 0.0, 0.0]]))[0]
    cropped = Volume(np.ascontiguousarray(phantom.voxels[crop]), type(geometry).create(
        (geometry.shape_ijk[0] - 20, *geometry.shape_ijk[1:]), geometry.spacing_mm, origin, geometry.direction_matrix))
    lungs = lung_mask(phantom)[crop]
    on_border = lungs[:, :, 0]
    assert on_border.any()
    assert automatic_region(cropped).contains(_voxel_centres(cropped, lungs)).all()


def test_every_lung_keypoint_of_the_pulmonary_crop_is_inside(pulmonary_ct):
    """The project's pulmonary crop has no air around the body; its lungs reach the border. Its
    lung-density voxels (below -400 HU; all of them but a few featureless ones within a cell of the
    border), the lungs' keypoints, and the keypoints of its synthetic pairs in both motion families
    lie in the automatic region."""
    lungs = pulmonary_ct.voxels < -400.0
    assert lungs[:, :, [0, -1]].any() or lungs[:, [0, -1]].any()
    region = automatic_region(pulmonary_ct)
    inner = np.zeros_like(lungs)
    inner[2:-2, 2:-2, 2:-2] = True
    assert region.contains(_voxel_centres(pulmonary_ct, lungs & inner)).all()
    assert region.contains(_voxel_centres(pulmonary_ct, lungs)).mean() > 0.99
    keypoints = forstner_keypoints(pulmonary_ct, lungs, 300, margin_mm=5.0)
    assert len(keypoints) >= 50
    assert region.contains(keypoints).all()
    for motion in ("breathing", "dirlab1"):
        pair = make_synthetic_pair(pulmonary_ct, seed=0, motion=motion)
        assert automatic_region(pair.fixed).contains(pair.fixed_points.points_lps_mm).all()


def test_mri_without_hounsfield_units():
    """MR signal (0-255, dark noisy background): the object is inside, the background border out."""
    rng = np.random.default_rng(0)
    phantom = phantom_ct()
    signal = np.clip((phantom.voxels + 1000.0) / 8.0, 0.0, None)  # air ~0, tissue ~130
    signal = np.abs(signal + rng.normal(0.0, 3.0, signal.shape)).astype(np.float32)  # Rician-like floor
    mri = Volume(signal, phantom.geometry, "mri")
    region = automatic_region(mri)
    body = phantom.voxels > -500.0
    assert region.contains(_voxel_centres(mri, body)).mean() > 0.99
    corner = np.zeros(mri.geometry.shape_kji, bool)
    corner[:, :4, :4] = True
    assert not region.contains(_voxel_centres(mri, corner)).any()


def test_real_liver_mri_landmarks_are_inside():
    root = require(LIVER_PAIRS)
    for pair in sorted(path for path in root.iterdir() if path.is_dir()):
        fixed = read_volume(pair / "fixed.nii.gz")
        points = read_points(pair / "fixed_points.csv", fixed.geometry).points_lps_mm
        assert automatic_region(fixed).contains(points).all(), pair.name


def test_a_user_mask_replaces_the_region_and_an_empty_one_is_refused():
    phantom = phantom_ct()
    inside = np.zeros(phantom.geometry.shape_kji, np.float32)
    inside[10:20, 10:20, 10:20] = 1
    region = region_from_mask(Volume(inside, phantom.geometry, "mask"))
    assert region.fraction == pytest.approx(1000 / inside.size)
    with pytest.raises(BadInputError, match="empty"):
        region_from_mask(Volume(np.zeros_like(inside), phantom.geometry, "mask"))
