"""The lesion series benchmark (issue 29) without tracking: the generated series' truth (volume courses,
labels, a nodule gone, RECIST categories from the truth labelmaps), and benchmarks/lesion_series.py's table
and its clean skip when the data is absent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_lesions import GEOMETRY, ball

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.io.volumes import Volume
from MedDIFTLib.evaluation.synthetic_lesions import (
    TRAJECTORIES,
    labelmap_responses,
    lesion_metrics,
    make_lesion_series,
    summarise,
    volume_course,
)
from MedDIFTLib.lesions.measure import measure
from MedDIFTLib.lesions.response import classify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lesion_series  # noqa: E402


@pytest.mark.parametrize("followups", [2, 3, 4])
def test_volume_courses_reach_their_factors_at_their_time_points(followups):
    rng = np.random.default_rng(0)
    grows, shrinks = volume_course("grows", followups, rng), volume_course("shrinks", followups, rng)
    assert np.all(np.diff(grows) > 0) and 1.5 <= grows[-1] <= 3.0 and grows[0] > 1.0
    assert np.all(np.diff(shrinks) < 0) and 0.25 <= shrinks[-1] <= 0.6
    turning = volume_course("shrinks then grows", followups, rng)
    turn = -(-followups // 2)
    assert np.argmin(turning) == turn - 1 and 0.25 <= turning[turn - 1] <= 0.6 and turning[-1] > turning[turn - 1]
    gone = volume_course("disappears", followups, rng)
    assert np.all(gone[followups // 2:] == 0) and np.all((0.25 < gone[: followups // 2]) & (gone[: followups // 2] < 1))
    with pytest.raises(ValueError, match="unknown trajectory"):
        volume_course("explodes", followups, rng)


@pytest.fixture(scope="module")
def series(elastix_ct):
    return make_lesion_series(elastix_ct, seed=1, time_points=4, disappears=True)


def test_generated_series_truth_follows_each_volume_course(series):
    assert len(series.scans) == len(series.labelmaps) == 4 and series.radii_mm.shape == (4, len(series.labels))
    assert series.labels == sorted(series.labels) and len(series.labels) >= 3
    assert set(series.trajectories) <= {*TRAJECTORIES, "disappears"} and series.trajectories.count("disappears") == 1
    baseline_ml = {label: (series.labelmaps[0] == label).sum() * np.prod(series.scans[0].geometry.spacing_mm)
                   for label in series.labels}
    for time_point, (scan, labelmap) in enumerate(zip(series.scans, series.labelmaps)):
        assert labelmap.shape == scan.geometry.shape_kji
        assert set(np.unique(labelmap)) <= {0, *series.labels}
        for n, label in enumerate(series.labels):
            truth_ml = (labelmap == label).sum() * np.prod(scan.geometry.spacing_mm)
            factor = (series.radii_mm[time_point, n] / series.radii_mm[0, n]) ** 3
            if factor == 0:
                assert truth_ml == 0  # a nodule gone has an empty truth mask
                continue
            assert truth_ml / baseline_ml[label] == pytest.approx(factor, rel=0.4)  # 5 mm slices
            ijk = scan.geometry.lps_to_ijk(series.centres_lps_mm[time_point, n][None])[0]
            k, j, i = np.round(ijk[::-1]).astype(int)
            assert labelmap[k, j, i] == label and scan.voxels[k, j, i] > -300
    gone = series.trajectories.index("disappears")
    assert series.radii_mm[1, gone] > 0 and np.all(series.radii_mm[2:, gone] == 0)
    # each follow-up its own motion: different sizes, different images
    assert len(set(np.round(series.motion_mm, 3))) == 3 and min(series.motion_mm) > 2.0
    assert not np.allclose(series.scans[1].voxels, series.scans[2].voxels)


def test_generated_series_responses_are_recist_on_the_truth_diameters(series):
    measured = [[measure(labelmap == label, scan.voxels, scan.geometry) for label in series.labels]
                for scan, labelmap in zip(series.scans, series.labelmaps)]
    assert series.targets == [label for label, m in zip(series.labels, measured[0]) if m.long_mm >= 10.0][:5]
    sums = [sum(0.0 if m.volume_ml == 0 else m.long_mm for label, m in zip(series.labels, row)
                if label in series.targets) for row in measured]
    assert [response.sld_mm for response in series.responses] == pytest.approx(sums)
    assert series.responses[0].category is None
    for time_point in range(1, 4):
        nadir = min(sums[:time_point])
        assert series.responses[time_point].category == classify(sums[time_point], sums[0], nadir)
    perfect = [summarise(lesion_metrics(series.pair(t), series.labelmaps[t], series.centres_lps_mm[t]))
               for t in range(1, 4)]
    assert all(found["centre_error_mean_mm"] == 0 and found["dice_median"] == 1 for found in perfect)
    assert all(found["volume_change_error_median_points"] == 0 for found in perfect)


def test_a_series_has_three_to_five_time_points(elastix_ct):
    with pytest.raises(BadInputError, match="3-5 time points"):
        make_lesion_series(elastix_ct, time_points=2)


def test_labelmap_responses_partial_then_complete_then_progression():
    """Two 21 mm targets and one 7 mm nodule (not measurable): both targets at 11 mm (PR), gone (CR), one back (PD)."""
    scan = Volume(np.zeros(GEOMETRY.shape_kji, np.float32), GEOMETRY)
    spheres = [((-12.0, 0.0, 0.0), 10.0), ((12.0, 0.0, 0.0), 10.0), ((0.0, 15.0, 0.0), 3.0)]

    def labelmap(radii):
        labels = np.zeros(GEOMETRY.shape_kji, np.int32)
        for n, ((centre, _), radius) in enumerate(zip(spheres, radii)):
            if radius:
                labels[ball(GEOMETRY, centre, radius)] = n + 1
        return labels

    courses = [(10.0, 10.0, 3.0), (5.0, 5.0, 3.0), (0.0, 0.0, 3.0), (5.0, 0.0, 3.0)]
    targets, responses = labelmap_responses([scan] * 4, [labelmap(radii) for radii in courses], [1, 2, 3])
    assert targets == [1, 2]
    assert [response.category for response in responses] == [None, "PR", "CR", "PD"]
    assert responses[2].sld_mm == 0 and responses[3].nadir_mm == 0


def _record(method_rows, categories, truth, seconds=10.0, seed=0):
    """A made-up stored series: one lesion, one row per follow-up (centre error, Dice, volume error, gone)."""
    rows = [[{"centre_error_mm": c, "hit_radius": True, "hit_10mm": True, "dice": d,
              "volume_change_error_points": v, "time_point": t + 1, "truth_gone": gone}]
            for t, (c, d, v, gone) in enumerate(method_rows)]
    return {"case": "elastix", "motion": "breathing", "seed": seed, "labels": [1], "true_categories": truth,
            "methods": {
        "meddift-auto": {"rows": rows, "categories": categories, "seconds": seconds},
        "convexadam-carry": {"rows": rows, "categories": truth, "seconds": 2 * seconds}}}


def test_the_table_has_a_row_per_time_point_and_method_and_scores_responses():
    records = [_record([(0.4, 0.9, 2.0, False), (0.6, 0.95, 4.0, False)], [None, "PR", "SD"], [None, "PR", "PD"]),
               _record([(0.2, 1.0, 0.0, True), (0.4, 0.85, 6.0, True)], [None, "SD", "PD"], [None, "SD", "PD"],
                       seed=1)]
    markdown, figures = lesion_series.table(records)
    lines = markdown.splitlines()
    assert lines[0].startswith("| time point | method |") and {line.count("|") for line in lines[:6]} == {8}
    assert lines[2] == "| T1 | convexadam-carry | 2 | 0.30 | 0.950 | 1.0 | 100 % |"
    assert lines[3] == "| T1 | meddift-auto | 2 | 0.30 | 0.950 | 1.0 | 100 % |"
    assert lines[5] == "| T2 | meddift-auto | 2 | 0.50 | 0.900 | 5.0 | 50 % |"
    assert figures["meddift-auto"]["last_over_first_centre_error"] == pytest.approx(0.5 / 0.3)
    assert figures["convexadam-carry"]["seconds_per_series"] == 20.0
    assert "True responses: T1 PR 1, SD 1; T2 PD 2." in markdown
    assert "meddift-auto reported 1 of 2 (lesion, time point) gone" in markdown  # Dice 1 with an empty truth


def test_absent_data_is_skipped_with_a_message_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lesion_series, "image_path", lambda case: tmp_path / f"no-{case}" / "image.nii.gz")
    out = tmp_path / "series.json"
    assert lesion_series.main(["--cases", "elastix", "--out", str(out)]) == 0
    message = capsys.readouterr().err
    assert "no-elastix" in message and "skipped" in message and "nothing to run" in message
    assert not out.exists()


def test_done_when_checks_name_each_failing_time_point():
    records = [_record([(0.4, 0.9, 2.0, False), (0.7, 0.95, 9.0, False)], [None, "PR", "PD"], [None, "PR", "PD"])]
    carry = records[0]["methods"]["convexadam-carry"]
    carry["rows"] = [[{**rows[0], "centre_error_mm": 0.3 if rows[0]["time_point"] == 1 else 0.9}]
                     for rows in carry["rows"]]  # T1: carry's centre better, Dice and volume tied
    markdown, figures = lesion_series.table(records)
    checks = figures["meddift-auto"]["done_when"]
    assert checks["centre error mean <= 0.6 mm"] == "unmet: T2 0.70"
    assert checks["Dice median >= 0.88"] == "met" and checks["response right >= 95 %"] == "met"
    assert checks["volume-change error median <= 8 points"] == "unmet: T2 9.0"
    assert checks["better than convexadam-carry on each"] == ("unmet: T1 centre, T1 Dice, T1 volume change, T2 Dice, "
                                                              "T2 volume change")
    assert checks["last/first centre error <= 1.2"] == "unmet: 1.75"
    assert "- meddift-auto: centre error mean <= 0.6 mm unmet: T2 0.70;" in markdown
    assert "done_when" not in figures["convexadam-carry"]


def test_results_files_merge_into_one_table_with_a_header_from_their_series(tmp_path):
    first = _record([(0.4, 0.9, 2.0, False), (0.6, 0.95, 4.0, False)], [None, "PR", "SD"], [None, "PR", "PD"])
    second = {**first, "case": "pulmonary", "motion": "dirlab1", "seed": 1}
    for name, record in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps({"markdown": "", "series": [record]}))
    out = tmp_path / "merged.json"
    assert lesion_series.main(["--summarise", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                               "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    assert [record["case"] for record in stored["series"]] == ["elastix", "pulmonary"]
    assert stored["markdown"].startswith("Lesion series: 2 generated series of 3 time points (elastix, pulmonary; "
                                         "seeds 0, 1; up to 1 nodules each")
    assert "breathing motion, mean 7 mm" in stored["markdown"] and "dirlab1 motion (fitted" in stored["markdown"]
    assert "| pulmonary | dirlab1 | 1 | 0.50 / 0.925 / 3.0 | 0.50 / 0.925 / 3.0 |" in stored["markdown"]
    with pytest.raises(SystemExit, match="in an earlier file too"):
        lesion_series.main(["--summarise", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(out)])
