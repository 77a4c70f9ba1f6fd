"""The ``meddift`` command line: end to end on a small real pair, and every bad input ends with a
one-line message, a non-zero exit code and no output file."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MedDIFTLib.cli import main
from MedDIFTLib.core.io import PointSet, read_points, write_points, write_volume
from MedDIFTLib.evaluation.metrics import tre_stats
from MedDIFTLib.evaluation.simulate import make_synthetic_pair


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, elastix_ct, elastix_landmarks):
    folder = tmp_path_factory.mktemp("pair")
    pair = make_synthetic_pair(elastix_ct, seed=3, points_lps_mm=elastix_landmarks.points_lps_mm,
                               labels=elastix_landmarks.labels)
    write_volume(pair.fixed, folder / "fixed.nii.gz")
    write_volume(pair.moving, folder / "moving.nrrd")
    ras = PointSet(pair.fixed_points.points_lps_mm[:12] * [-1, -1, 1], pair.fixed_points.labels[:12])
    (folder / "fixed.mrk.json").write_text(json.dumps({"markups": [{
        "type": "Fiducial", "coordinateSystem": "RAS",
        "controlPoints": [{"label": label, "position": list(p)} for label, p in zip(ras.labels, ras.points_lps_mm)],
    }]}))
    return folder, pair


def test_match_writes_labelled_markups(pair_files, tmp_path, capsys):
    folder, pair = pair_files
    out = tmp_path / "moving.mrk.json"
    code = main(["match", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--points",
                 str(folder / "fixed.mrk.json"), "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Matched 12 points" in printed and str(out) in printed
    matched = read_points(out)
    assert matched.labels == pair.fixed_points.labels[:12]
    assert all("confidence" in description for description in matched.descriptions)
    assert tre_stats(matched.points_lps_mm, pair.moving_points.points_lps_mm[:12])["mean"] < 2.0


def test_match_writes_csv_with_scores(pair_files, tmp_path):
    folder, _ = pair_files
    out = tmp_path / "moving.csv"
    assert main(["match", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--points",
                 str(folder / "fixed.mrk.json"), "--out", str(out), "--quiet", "--search-radius-mm", "12"]) == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["label", "l", "p", "s", "confidence", "similarity", "forward_backward_mm", "reliable",
                      "description"]


def _bad_inputs(folder, tmp_path):
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(20, 20, sitk.sitkInt16), str(flat))
    nan = tmp_path / "nan.nrrd"
    image = sitk.ReadImage(str(folder / "fixed.nii.gz"), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    sitk.WriteImage(nan_image, str(nan))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x00" * 100)
    empty = tmp_path / "empty.csv"
    empty.write_text("label,l,p,s\n")
    far = tmp_path / "far.csv"
    far.write_text("label,l,p,s\nfar away,5000,5000,5000\n")
    points = str(folder / "fixed.mrk.json")
    fixed, moving = str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd")
    return {
        "unreadable file": ([str(broken), moving, "--points", points], "cannot read as an image"),
        "missing file": ([str(tmp_path / "absent.nii.gz"), moving, "--points", points], "no such file"),
        "2D image": ([fixed, str(flat), "--points", points], "3D"),
        "NaN voxels": ([str(nan), moving, "--points", points], "NaN"),
        "empty point file": ([fixed, moving, "--points", str(empty)], "no points"),
        "points outside the volume": ([fixed, moving, "--points", str(far)], "outside the fixed volume"),
        "unknown backbone": ([fixed, moving, "--points", points, "--backbone", "resnet"], "unknown backbone"),
        "bad output extension": ([fixed, moving, "--points", points, "--out-ext", ".txt"], "output must end in"),
    }


@pytest.mark.parametrize("case", ["unreadable file", "missing file", "2D image", "NaN voxels", "empty point file",
                                  "points outside the volume", "unknown backbone", "bad output extension"])
def test_bad_input_gives_one_line_error_and_no_output(pair_files, tmp_path, capsys, case):
    folder, _ = pair_files
    arguments, message = _bad_inputs(folder, tmp_path)[case]
    extension = ".mrk.json"
    if "--out-ext" in arguments:
        extension = arguments[arguments.index("--out-ext") + 1]
        arguments = arguments[: arguments.index("--out-ext")]
    out = tmp_path / "out" / f"result{extension}"
    code = main(["match", *arguments, "--out", str(out), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code != 0
    assert len(error.splitlines()) == 1 and error.startswith("meddift: error:") and message in error
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_existing_output_is_kept_when_the_job_fails(pair_files, tmp_path):
    folder, _ = pair_files
    out = tmp_path / "keep.csv"
    write_points(PointSet(np.zeros((1, 3)), ["mine"]), out)
    before = out.read_text()
    code = main(["match", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--points",
                 str(folder / "fixed.mrk.json"), "--out", str(out), "--backbone", "resnet"])
    assert code != 0 and out.read_text() == before


def test_simulate_writes_a_pair_and_refuses_to_overwrite(elastix_ct, tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_volume(elastix_ct, ct)
    out = tmp_path / "pair"
    assert main(["simulate", str(ct), str(out), "--seed", "2", "--num-keypoints", "30"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["fixed.nii.gz", "moving.nii.gz", "fixed_points.csv", "moving_points_true.csv",
                            "pair.json"])
    summary = json.loads((out / "pair.json").read_text())
    assert abs(summary["motion_mm"]["mean"] - 7.0) < 0.05 and summary["jacobian_min"] > 0
    fixed_points, true_points = read_points(out / "fixed_points.csv"), read_points(out / "moving_points_true.csv")
    assert fixed_points.labels == true_points.labels
    capsys.readouterr()
    assert main(["simulate", str(ct), str(out)]) != 0
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == names


def test_console_entry_point_runs():
    completed = subprocess.run([sys.executable, "-m", "MedDIFTLib", "--help"], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0
    for command in ("match", "simulate", "demo", "weights"):
        assert command in completed.stdout
