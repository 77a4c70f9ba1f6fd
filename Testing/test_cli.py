"""The ``meddift`` command line: end to end on a small real pair, and every bad input ends with a
one-line message, a non-zero exit code and no output file."""

import csv
import json
import os
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


def test_match_skips_an_unplaced_markup_and_says_so(pair_files, tmp_path, capsys):
    folder, pair = pair_files
    document = json.loads((folder / "fixed.mrk.json").read_text())
    document["markups"][0]["controlPoints"][1]["positionStatus"] = "undefined"
    points_file = tmp_path / "partly_placed.mrk.json"
    points_file.write_text(json.dumps(document))
    out = tmp_path / "moving.csv"
    assert main(["match", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--points", str(points_file),
                 "--out", str(out), "--quiet", "--search-radius-mm", "12"]) == 0
    skipped = pair.fixed_points.labels[1]
    assert f"meddift: note: {points_file}: skipped point {skipped!r}: not placed" in capsys.readouterr().err
    assert read_points(out).labels == [label for label in pair.fixed_points.labels[:12] if label != skipped]


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
    image = sitk.ReadImage(str(folder / "moving.nrrd"))
    image.SetOrigin([v + 2000.0 for v in image.GetOrigin()])
    elsewhere = tmp_path / "elsewhere.nrrd"
    sitk.WriteImage(image, str(elsewhere))
    return {
        "volumes apart": ([fixed, str(elsewhere), "--points", points], "the volumes do not overlap"),
        "unreadable file": ([str(broken), moving, "--points", points], "cannot read as an image"),
        "missing file": ([str(tmp_path / "absent.nii.gz"), moving, "--points", points], "no such file"),
        "2D image": ([fixed, str(flat), "--points", points], "3D"),
        "NaN voxels": ([str(nan), moving, "--points", points], "NaN"),
        "empty point file": ([fixed, moving, "--points", str(empty)], "no points"),
        "points outside the volume": ([fixed, moving, "--points", str(far)], "outside the fixed volume"),
        "unknown backbone": ([fixed, moving, "--points", points, "--backbone", "resnet"], "unknown backbone"),
        "bad output extension": ([fixed, moving, "--points", points, "--out-ext", ".txt"], "output must end in"),
    }


@pytest.mark.parametrize("case", ["volumes apart", "unreadable file", "missing file", "2D image", "NaN voxels",
                                  "empty point file", "points outside the volume", "unknown backbone",
                                  "bad output extension"])
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


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("meddift: error:") and len(error.splitlines()) == 1, error
    return error


def test_help_states_defaults_from_the_one_source_of_options(capsys):
    from MedDIFTLib.core.options import FieldOptions, MatchOptions, RunSettings, describe

    with pytest.raises(SystemExit):
        main(["match", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"backbone {RunSettings.backbone}" in text and f"mode {MatchOptions.mode}" in text
    assert "label,l,p,s,confidence,similarity,forward_backward_mm,reliable,description" in text
    assert " ".join(describe(MatchOptions, "search_radius_mm").split()) in text
    assert " ".join(describe(MatchOptions, "confidence_threshold").split()) in text
    with pytest.raises(SystemExit):
        main(["register", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sitk.ReadTransform(path)" in text and "sitk.ReadTransform does not read it" in text
    assert " ".join(describe(FieldOptions, "optimise_iterations").split()) in text
    levels = FieldOptions().levels
    assert f"the first level's radius; default {levels[0].search_radius_mm:g})" in text
    assert f"(the last level's; default {levels[-1].spacing_mm:g})" in text


def test_register_field_options_come_from_the_option_classes():
    """No flag: the default levels. The level flags set the largest motion (the first level's radius),
    the finest lattice (the last level's spacing; no earlier level finer) and its smoothing."""
    from MedDIFTLib.cli import build_parser
    from MedDIFTLib.cli.common import field_options_from_args
    from MedDIFTLib.core.options import FieldOptions

    parser = build_parser()
    base = ["register", "f.nii.gz", "m.nii.gz", "--out-transform", "t.h5"]
    default = FieldOptions()
    assert field_options_from_args(parser.parse_args(base)) == default
    first, last = default.levels[0], default.levels[-1]
    options = field_options_from_args(parser.parse_args([*base, "--grid-spacing-mm", "10", "--optimise-iterations",
                                                         "0", "--search-radius-mm", "20", "--smoothness-mm", "7"]))
    assert options.optimise_iterations == 0 and len(options.levels) == len(default.levels)
    assert options.levels[0].search_radius_mm == 20.0 and options.levels[-1].search_radius_mm == last.search_radius_mm
    assert [level.spacing_mm for level in options.levels] == [10.0] * len(default.levels)
    assert options.levels[-1].smoothness_mm == 7.0 and options.levels[0].smoothness_mm == first.smoothness_mm


def test_track_lesion_options_come_from_the_option_class():
    from MedDIFTLib.cli import build_parser
    from MedDIFTLib.cli.common import options_from_args
    from MedDIFTLib.core.options import LesionOptions, SeriesOptions

    parser = build_parser()
    base = ["track", "b.nii.gz", "f.nii.gz", "--lesions", "l.nii.gz", "--out", "out"]
    assert options_from_args(parser.parse_args(base), LesionOptions) == LesionOptions()
    flags = ["--largest-volume-factor", "8", "--seed-radius-mm", "30", "--centre-search-radius-mm", "10"]
    options = options_from_args(parser.parse_args([*base, *flags]), LesionOptions)
    assert (options.largest_volume_factor, options.seed_radius_mm, options.centre_search_radius_mm) == (8, 30, 10)
    batch = options_from_args(parser.parse_args(["batch", "rows.csv", "--out", "o", "--task", "track", *flags]),
                              LesionOptions)
    assert batch == options
    series = ["--series", "chained", "--measurable-mm", "8", "--max-targets", "2"]
    for command in (base, ["batch", "rows.csv", "--out", "o", "--task", "track"]):
        assert options_from_args(parser.parse_args([*command, *series]), SeriesOptions) == SeriesOptions(
            route="chained", measurable_mm=8.0, max_targets=2)


@pytest.mark.parametrize("flags, message", [
    (["--grid-spacing-mm", "0"], "--grid-spacing-mm: option 'spacing_mm' must be > 0"),
    (["--search-radius-mm", "-1"], "--search-radius-mm: option 'search_radius_mm' must be > 0"),
    (["--optimise-iterations", "-2"], "--optimise-iterations: option 'optimise_iterations' must be >= 0"),
])
def test_register_option_out_of_range_names_the_flag_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "out" / "field.nii.gz"
    assert main(["register", "f.nii.gz", "m.nii.gz", "--out-transform", str(out), *flags]) == 2
    error = _one_line_error(capsys)
    assert message in error and "FieldLevel(" not in error and not out.parent.exists()


def _unwritable_outputs(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a file")
    return {
        "proc": "/proc/meddift_out.csv",
        "under a file": str(plain / "out.csv"),
    }


@pytest.mark.parametrize("where", ["proc", "under a file"])
def test_match_unwritable_output_is_refused_before_any_work(pair_files, tmp_path, capsys, where):
    folder, _ = pair_files
    out = _unwritable_outputs(tmp_path)[where]
    code = main(["match", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--points",
                 str(folder / "fixed.mrk.json"), "--out", out, "--quiet"])
    assert code == 2
    assert "Traceback" not in _one_line_error(capsys)
    assert (tmp_path / "plain.txt").read_text() == "a file"


@pytest.mark.parametrize("warped, message", [("warped.png", "output must end in"),
                                             ("warped.xyz", "output must end in")])
def test_register_bad_warped_output_is_refused_before_any_work(pair_files, tmp_path, capsys, warped, message):
    folder, _ = pair_files
    transform = tmp_path / "field.h5"
    code = main(["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--out-transform",
                 str(transform), "--out-warped", str(tmp_path / warped), "--quiet"])
    assert code == 2
    error = _one_line_error(capsys)
    assert message in error and ".part" not in error
    assert sorted(tmp_path.iterdir()) == []


def test_register_out_points_has_the_columns_of_match(pair_files, tmp_path):
    folder, pair = pair_files
    points = tmp_path / "fixed.csv"
    write_points(PointSet(pair.fixed_points.points_lps_mm[:6], pair.fixed_points.labels[:6]), points)
    out = tmp_path / "carried.csv"
    assert main(["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nrrd"), "--out-transform",
                 str(tmp_path / "field.nii.gz"), "--points", str(points), "--out-points", str(out), "--quiet",
                 "--optimise-iterations", "0", "--device", "cpu"]) == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["label", "l", "p", "s", "confidence", "similarity", "forward_backward_mm", "reliable",
                             "description"]
    assert [row["label"] for row in rows] == pair.fixed_points.labels[:6]
    assert all(row["confidence"] == "nan" and "no per-point confidence" in row["description"] for row in rows)
    assert all(row["reliable"] == "1" and "Jacobian determinant" in row["description"] for row in rows)
    summary = json.loads((tmp_path / "field.nii.gz.json").read_text())
    assert {"min", "fraction_folding"} <= set(summary["jacobian"]) and summary["options"]["optimise_iterations"] == 0


def test_simulate_zero_motion_and_folding_motion(elastix_ct, tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_volume(elastix_ct, ct)
    still = tmp_path / "still"
    assert main(["simulate", str(ct), str(still), "--mean-motion-mm", "0", "--num-keypoints", "20"]) == 0
    summary = json.loads((still / "pair.json").read_text())
    assert summary["motion_mm"]["mean"] == 0.0 and summary["jacobian_min"] == pytest.approx(1.0)
    assert oct((still / "pair.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert oct(still.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    capsys.readouterr()
    assert main(["simulate", str(ct), str(tmp_path / "negative"), "--mean-motion-mm", "-1"]) == 2
    assert "--mean-motion-mm: option 'mean_motion_mm' must be >= 0" in _one_line_error(capsys)
    folded = tmp_path / "folded"
    assert main(["simulate", str(ct), str(folded), "--mean-motion-mm", "60", "--num-keypoints", "20"]) == 2
    error = _one_line_error(capsys)
    assert "folds the synthetic ground truth" in error and not folded.exists()
    assert main(["simulate", str(ct), str(folded), "--mean-motion-mm", "60", "--num-keypoints", "20",
                 "--allow-folding"]) == 0
    assert "warning" in capsys.readouterr().err and json.loads((folded / "pair.json").read_text())["jacobian_min"] <= 0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_simulate_into_a_closed_pipe_ends_quietly(tmp_path):
    from MedDIFTLib.evaluation.simulate import phantom_ct

    ct = tmp_path / "phantom.nii.gz"
    write_volume(phantom_ct(0), ct)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run([sys.executable, "-m", "MedDIFTLib", "simulate", str(ct), str(tmp_path / "pair"),
                                    "--num-keypoints", "20"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                   timeout=300)
    finally:
        os.close(write_end)
    assert completed.returncode == 141 and "Traceback" not in completed.stderr, completed.stderr
    assert (tmp_path / "pair" / "pair.json").is_file()
