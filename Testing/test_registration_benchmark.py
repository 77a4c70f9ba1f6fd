"""benchmarks/registration.py without running a registration: pair names, the liver / outside split of the
real pairs' landmarks, the table's columns and ratios, the notes, and a clean skip when the data is absent."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import registration  # noqa: E402


def test_pair_names_say_the_motion_and_its_scale():
    assert registration.motion_tag("breathing", 1.0) == ""
    assert registration.motion_tag("dirlab1", 1.0) == "-dirlab1"
    assert registration.motion_tag("dirlab1", 2.0) == "-dirlab1x2"
    assert registration.motion_tag("dirlab2", 1.5) == "-dirlab2x1.5"


def test_liver_and_outside_landmarks_are_scored_apart():
    labels = ["liver-00", "liver-01", "outside-00", "K-1"]
    groups = registration.group_errors(labels, np.array([1.0, 3.0, 10.0, 100.0]))
    assert groups["liver"]["mean"] == 2.0 and groups["liver"]["points"] == 2
    assert groups["outside"] == {"mean": 10.0, "p95": 10.0, "points": 1}
    assert registration.group_errors(["K-1", "K-2"], np.array([1.0, 2.0])) == {}


def _row(pair, data, method, mean, wall, groups=None, jacobian=None, grid_mm=None):
    return {"pair": pair, "data": data, "method": method, "mean": mean, "p95": 2 * mean, "points": 3,
            "groups": groups or {}, "folding": None if jacobian is None else 0.001,
            "jacobian_min": None if jacobian is None else jacobian[0],
            "jacobian_max": None if jacobian is None else jacobian[1], "wall": wall, "cpu": wall, "peak_gb": 0.5,
            "grid_mm": grid_mm}


def test_the_table_has_one_cell_per_column_and_ratios_to_convexadam():
    liver = {"liver": {"mean": 1.5, "p95": 3.0, "points": 32}, "outside": {"mean": 4.0, "p95": 8.0, "points": 20}}
    rows = [
        _row("liver-a", "real", "identity", 10.0, 0.0, liver),
        _row("liver-a", "real", "convexadam", 2.0, 20.0, liver, (0.4, 2.5), 1.36719),
        _row("liver-a", "real", "meddift-mind", 1.0, 5.0, liver, (-0.1, 3.0)),
        _row("popi-dirlab1x3-seed0", "synthetic", "match-mind", 0.8, 1.0),
        _row("liver-a", "real", "match-mind", 0.8, 1.0, liver),
    ]
    lines = registration.markdown(rows).splitlines()
    assert {line.count("|") for line in lines} == {lines[0].count("|")}
    assert "liver mean mm | outside mean mm" in lines[0] and "Jacobian min / max" in lines[0]
    register = lines[4]
    assert "| 1.50 | 4.00 |" in register and "| -0.10 / 3.00 |" in register
    # mean, p95, wall over ConvexAdam's on the pair; mean and p95 over the point engine's at the same points
    assert register.endswith("| 0.50 | 0.50 | 0.25 | 1.25 | 1.25 |")
    assert lines[5].endswith("|  |  |  |  |  |")  # no ConvexAdam on that pair, not the field: no ratio
    notes = registration.notes(rows, {"popi-dirlab1x3-seed0": -0.08}, {"bspline": "not installed"}, ["elastix"])
    assert notes[0] == "- ConvexAdam on an isotropic 1.367 mm grid: liver-a"
    assert "popi-dirlab1x3-seed0 (min -0.08)" in notes[1]
    assert notes[2:] == ["- bspline: not run (not installed)", "- elastix: not run (data folder absent)"]


def test_motion_recovered_is_the_median_share_of_the_true_motion_along_it():
    fixed = np.zeros((4, 3))
    truth = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 4.0], [0.5, 0.0, 0.0]])
    moved = np.array([[8.0, 3.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    assert registration.motion_recovered(fixed, moved, truth) == pytest.approx(0.9)  # the last moves < 1 mm
    assert registration.motion_recovered(fixed, moved, fixed) is None


def test_absent_data_is_skipped_with_a_message_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registration, "LIVER_DIR", tmp_path / "no-liver")
    monkeypatch.setattr(registration, "case_folder", lambda case: tmp_path / f"no-{case}")
    results = tmp_path / "results.json"
    assert registration.main(["--cases", "liver", "popi", "--results", str(results), "--out", str(tmp_path)]) == 0
    message = capsys.readouterr().err
    assert "no-liver not found: skipped" in message and "no-popi not found" in message
    assert "nothing to run" in message and not results.exists()


def test_the_readme_results_file_is_the_default_and_motion_scales_must_be_positive(capsys):
    assert registration.RESULTS.parts[-3:] == ("benchmarks", "results", "registration.json")
    with pytest.raises(SystemExit):
        registration.main(["--motion-scale", "1", "0"])
    assert "--motion-scale: factors must be above 0" in capsys.readouterr().err
