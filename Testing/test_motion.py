"""The DIR-Lab motion family of the synthetic pairs: a thin-plate spline through real landmark displacements."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA_DIR, DIRLAB_DIR, require
from scipy import ndimage

from MedDIFTLib.cli import main
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.io import write_volume
from MedDIFTLib.evaluation.dirlab_motion import dirlab_landmarks_mm, dirlab_motion
from MedDIFTLib.evaluation.simulate import lung_mask, make_synthetic_pair


@pytest.fixture(scope="module")
def lung_points(elastix_ct):
    require(DIRLAB_DIR)
    return elastix_ct.geometry.ijk_to_lps(np.argwhere(lung_mask(elastix_ct))[:, ::-1].astype(float))


@pytest.mark.parametrize("case", [1, 2])
def test_spline_interpolates_the_mapped_displacements_inside_the_lung_box(lung_points, case):
    spline, positions, displacements = dirlab_motion(case, lung_points, folder=DATA_DIR)
    residual = np.linalg.norm(spline(positions) - displacements, axis=1)
    assert np.median(residual) < 0.1 and residual.mean() < 0.3
    inhale_mm, exhale_mm = dirlab_landmarks_mm(case, DATA_DIR)
    assert np.allclose(displacements, inhale_mm - exhale_mm)
    low, high = lung_points.min(axis=0), lung_points.max(axis=0)
    assert (positions >= low - 30).all() and (positions <= high + 30).all()
    # exhale: the lung base moves up, so the pull field (T00 - T50) points down (-S) at the base
    assert displacements[:, 2].mean() < -1.0


def test_magnitude_follows_motion_scale(lung_points):
    _, _, unit = dirlab_motion(1, lung_points, folder=DATA_DIR)
    spline, positions, doubled = dirlab_motion(1, lung_points, motion_scale=2.0, folder=DATA_DIR)
    assert np.allclose(doubled, 2 * unit)
    assert np.allclose(spline(positions[:20]), 2 * dirlab_motion(1, lung_points, folder=DATA_DIR)[0](positions[:20]),
                       atol=1e-6)


@pytest.mark.parametrize("motion", ["dirlab1", "dirlab2"])
def test_pair_ground_truth_is_the_motion_without_folding(elastix_ct, motion):
    require(DIRLAB_DIR)
    pair = make_synthetic_pair(elastix_ct, motion=motion, num_keypoints=40, mean_motion_mm=3.0)
    assert pair.jacobian_min > 0
    fixed, moving = pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm
    assert len(fixed) > 10
    # M(y) = F(y + v(y)): the moving partner plus the pull field there lands on the fixed point
    kji = pair.field_geometry.lps_to_ijk(moving)[:, ::-1].T
    pull = np.stack([ndimage.map_coordinates(pair.pull_field_lps_mm[..., c], kji, order=1, mode="nearest")
                     for c in range(3)], axis=1)
    assert np.abs(moving + pull - fixed).max() < 0.05
    # the real magnitude is kept: mean_motion_mm applies to the breathing model only
    motion_mm = np.linalg.norm(moving - fixed, axis=1).mean()
    assert 2.0 < motion_mm < 8.0
    doubled = make_synthetic_pair(elastix_ct, motion=motion, num_keypoints=40, motion_scale=2.0, allow_folding=True)
    assert np.allclose(doubled.pull_field_lps_mm, 2 * pair.pull_field_lps_mm, atol=1e-4)


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch, elastix_ct):
    monkeypatch.setenv("MEDDIFT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(BadInputError, match="nowhere/dirlab4dct_landmarks/case2: DIR-Lab landmark folder not found"):
        make_synthetic_pair(elastix_ct, motion="dirlab2", num_keypoints=10)


def test_unknown_motion_is_refused(elastix_ct):
    with pytest.raises(BadInputError, match="motion"):
        make_synthetic_pair(elastix_ct, motion="dirlab7", num_keypoints=10)


def test_simulate_command_takes_the_motion_family(elastix_ct, tmp_path):
    require(DIRLAB_DIR)
    ct = tmp_path / "ct.nii.gz"
    write_volume(elastix_ct, ct)
    out = tmp_path / "pair"
    assert main(["simulate", str(ct), str(out), "--motion", "dirlab2", "--motion-scale", "1.5",
                 "--num-keypoints", "20"]) == 0
    summary = json.loads((out / "pair.json").read_text(encoding="utf-8"))
    assert summary["motion"] == "dirlab2" and summary["motion_scale"] == 1.5
    with pytest.raises(SystemExit):
        main(["simulate", str(ct), str(tmp_path / "bad"), "--motion", "popi"])


def test_lesion_pairs_take_the_dirlab_motion(elastix_ct):
    require(DIRLAB_DIR)
    from MedDIFTLib.evaluation.synthetic_lesions import make_lesion_pair

    breathing = make_lesion_pair(elastix_ct, count=2, seed=1, mean_motion_mm=3.0)
    dirlab = make_lesion_pair(elastix_ct, count=2, seed=1, mean_motion_mm=3.0, motion="dirlab1")
    assert np.array_equal(breathing.baseline.voxels, dirlab.baseline.voxels)
    assert not np.allclose(breathing.followup.voxels, dirlab.followup.voxels)
    with pytest.raises(BadInputError):
        make_lesion_pair(elastix_ct, count=2, seed=1, motion="sideways")
