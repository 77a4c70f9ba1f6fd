"""Lesions over a series of scans (issue 29): the RECIST 1.1 rules at every boundary, the auto route's
choice, and a 4-scan series end to end through ``meddift track`` with each route.

The series: a baseline and three follow-ups of a small synthetic lung (each scan moved and with its own
noise), lesion 1 shrinking then growing (PR, PR, PD), lesion 2 gone from the first follow-up on
(reported ``not_found`` at every follow-up, never dropped), lesion 3 too small to be a target lesion.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from test_lesions import GEOMETRY, ball, labelmap_volume, lung_with_nodules

from MedDIFTLib.cli import main
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import read_volume, write_volume
from MedDIFTLib.core.io.volumes import Volume
from MedDIFTLib.core.options import SeriesOptions
from MedDIFTLib.evaluation.synthetic_lesions import dice
from MedDIFTLib.lesions.measure import EMPTY, Measurement
from MedDIFTLib.lesions.outputs import FILES as PAIR_FILES
from MedDIFTLib.lesions.response import assess, classify
from MedDIFTLib.lesions.series import LesionVisit, check_series, choose_route, choose_targets, responses_of
from MedDIFTLib.lesions.series_outputs import CSV_COLUMNS, FILES, RESPONSE_COLUMNS, labelmap_name
from MedDIFTLib.lesions.track import LesionResult

# ---------------------------------------------------------------------------------------------
# RECIST 1.1 (Eisenhauer et al. 2009): every boundary


def test_partial_response_starts_at_exactly_30_percent_below_baseline():
    assert classify(70.0, baseline_mm=100.0, nadir_mm=100.0) == "PR"
    assert classify(70.1, baseline_mm=100.0, nadir_mm=100.0) == "SD"
    assert classify(21.0, baseline_mm=30.0, nadir_mm=30.0) == "PR"  # 0.3 x 30 is not exact in floating point


def test_progression_needs_20_percent_and_5_mm_over_the_nadir():
    assert classify(24.9, baseline_mm=20.0, nadir_mm=20.0) == "SD"  # +24.5 % but 4.9 mm
    assert classify(25.0, baseline_mm=20.0, nadir_mm=20.0) == "PD"  # +25 % and 5 mm
    assert classify(59.9, baseline_mm=50.0, nadir_mm=50.0) == "SD"  # 9.9 mm but +19.8 %
    assert classify(60.0, baseline_mm=50.0, nadir_mm=50.0) == "PD"  # exactly +20 %
    assert classify(14.9, baseline_mm=40.0, nadir_mm=10.0) == "PR"  # +49 % over the nadir, 4.9 mm: still PR
    assert classify(15.0, baseline_mm=40.0, nadir_mm=10.0) == "PD"  # progression wins over PR vs baseline


def test_complete_response_and_not_evaluable():
    assert classify(0.0, baseline_mm=30.0, nadir_mm=30.0) == "CR"
    assert classify(0.0, baseline_mm=30.0, nadir_mm=0.0) == "CR"
    assert classify(5.0, baseline_mm=30.0, nadir_mm=0.0) == "PD"  # reappearance after CR, 5 mm
    assert classify(4.9, baseline_mm=30.0, nadir_mm=0.0) == "PR"
    assert classify(10.0, baseline_mm=30.0, nadir_mm=30.0, evaluable=False) == "NE"
    assert classify(10.0, baseline_mm=0.0, nadir_mm=0.0) == "NE"  # no target lesion


def test_nadir_is_the_smallest_evaluable_sum_before_the_time_point():
    responses = assess([50.0, 30.0, 40.0, 20.0, 15.0, 24.9, 10.0], [True, True, True, True, False, True, True])
    # time point 4 is not evaluable: its 15 mm is no nadir, so 24.9 mm is 4.9 mm above the nadir (20), not PD
    assert [r.category for r in responses] == [None, "PR", "PD", "PR", "NE", "PR", "PR"]
    assert [r.nadir_mm for r in responses] == [50.0, 50.0, 30.0, 30.0, 20.0, 20.0, 20.0]
    assert responses[2].change_from_nadir_pct == pytest.approx(100 / 3)
    assert responses[3].change_from_baseline_pct == pytest.approx(-60.0)
    # the baseline counts as the nadir until a smaller sum comes
    assert [r.category for r in assess([20.0, 24.0, 25.0])] == [None, "SD", "PD"]
    assert [r.category for r in assess([0.0, 0.0])] == [None, "NE"]
    assert math.isnan(assess([0.0, 3.0])[1].change_from_baseline_pct)


# ---------------------------------------------------------------------------------------------
# Targets, sums and the auto route's choice, on made-up lesions


def visit(label: int, time_point: int, long_mm: float, flags=(), volume_ml: float = 1.0) -> LesionVisit:
    measured = Measurement(volume_ml, long_mm, long_mm / 2, 30.0, (0.0, 0.0, 0.0)) if volume_ml else EMPTY
    return LesionVisit(label, str(label), time_point, np.zeros(3), 0.9, 0.5, measured, list(flags))


def test_targets_are_the_largest_measurable_lesions_and_sums_count_a_lesion_gone_as_zero():
    baseline = [visit(1, 0, 12.0), visit(2, 0, 9.9), visit(3, 0, 30.0, ["touches_border"]), visit(4, 0, 15.0),
                visit(5, 0, 11.0)]
    assert choose_targets(baseline, SeriesOptions()) == [1, 4, 5]
    assert choose_targets(baseline, SeriesOptions(max_targets=2)) == [1, 4]
    assert choose_targets(baseline, SeriesOptions(measurable_mm=9.0)) == [1, 2, 4, 5]
    followup = [visit(1, 1, 8.0), visit(2, 1, 20.0), visit(3, 1, 30.0), visit(4, 1, 0.0, ["not_found"], 0.0),
                visit(5, 1, 11.0)]
    left = [visit(1, 2, 8.0), visit(2, 2, 20.0), visit(3, 2, 30.0), visit(4, 2, 3.0, ["leaves_volume"]),
            visit(5, 2, 11.0)]
    responses = responses_of([baseline, followup, left], [1, 4, 5])
    assert [r.sld_mm for r in responses] == [38.0, 19.0, 22.0]
    assert [r.category for r in responses] == [None, "PR", "NE"]


def result(centre, confidence: float, volume_ml: float = 1.0) -> LesionResult:
    after = Measurement(volume_ml, 10.0, 8.0, 30.0, tuple(centre)) if volume_ml else EMPTY
    return LesionResult(1, "1", np.asarray(centre, float), np.asarray(centre, float), confidence, 0.5, after, after)


def test_auto_keeps_the_direct_lesion_unless_the_routes_disagree_and_chained_is_more_confident():
    assert choose_route(result((0, 0, 0), 0.9), result((2, 0, 0), 0.6), 4.0, 3.0) == "direct"  # agree
    assert choose_route(result((0, 0, 0), 0.6), result((5, 0, 0), 0.9), 4.0, 3.0) == "direct"
    assert choose_route(result((0, 0, 0), 0.9), result((5, 0, 0), 0.6), 4.0, 3.0) == "chained"
    assert choose_route(result((0, 0, 0), 0.9), result((0, 0, 0), 0.7), 4.0, 3.0) == "direct"
    assert choose_route(result((0, 0, 0), 0.6, 0.0), result((1, 0, 0), 0.7), 4.0, 3.0) == "direct"  # only one found


def test_series_memory_counts_every_scan_read_and_auto_s_third_features():
    """Three scans on one grid: a route holds the largest pair and the third scan's volume; ``auto`` holds
    the third scan's features as well (baseline, previous and current follow-up)."""
    from MedDIFTLib.core.budget import estimate_register
    from MedDIFTLib.core.options import FieldOptions
    from MedDIFTLib.lesions.series import series_estimate

    scans = [Volume(np.zeros(GEOMETRY.shape_kji, np.float32), GEOMETRY)] * 3
    pair = estimate_register(GEOMETRY, GEOMETRY, FieldOptions(), what="track")
    by_route = {route: series_estimate(scans, route, FieldOptions()) for route in ("chained", "direct", "auto")}
    for route, estimate in by_route.items():
        assert estimate.parts["other scans' volumes"] == pair.parts["volumes"] // 2
        assert ("a third scan's features" in estimate.parts) == (route == "auto")
    assert by_route["auto"].total_bytes == by_route["direct"].total_bytes + pair.parts["features"] // 2
    assert series_estimate(scans[:2], "auto", FieldOptions()).parts == pair.parts


def test_series_inputs_are_checked():
    baseline = lung_with_nodules(GEOMETRY, [((0, 0, 0), 5.0)])
    with pytest.raises(BadInputError, match="at least one follow-up"):
        check_series(baseline, [])
    mri = Volume(np.full(GEOMETRY.shape_kji, 300.0, np.float32), GEOMETRY, "mri.nii.gz")
    with pytest.raises(BadInputError, match="mri.nii.gz is not a CT in HU.*another modality"):
        check_series(baseline, [baseline, mri])
    far = Geometry.create((40, 36, 30), (1.5, 1.5, 2.0), (500.0, -25.0, -20.0))
    with pytest.raises(BadInputError, match="do not overlap"):
        check_series(baseline, [Volume(baseline.voxels, far, "elsewhere")])


# ---------------------------------------------------------------------------------------------
# A 4-scan series end to end

CENTRES = [(-8.0, 0.0, 0.0), (14.0, 6.0, 6.0), (2.0, -12.0, 18.0)]
SHIFTS_LPS_MM = [(0.0, 0.0, 0.0), (4.0, -3.0, 2.0), (-3.0, 2.0, 1.0), (2.0, 3.0, -2.0)]
RADII_MM = [(7.0, 6.0, 4.0), (5.0, 0.0, 4.0), (5.5, 0.0, 4.0), (9.0, 0.0, 4.0)]  # per scan; 0: gone
FAST = ["--grid-spacing-mm", "8", "--search-radius-mm", "12", "--optimise-iterations", "0", "--quiet",
        "--backbone", "mind", "--device", "cpu"]


def truth(time_point: int, lesion: int) -> tuple[np.ndarray, float]:
    """Centre (LPS mm) and radius (mm) of ``lesion`` (0-based) in scan ``time_point``."""
    return np.asarray(CENTRES[lesion]) + SHIFTS_LPS_MM[time_point], RADII_MM[time_point][lesion]


def write_series(folder: Path) -> tuple[list[str], str]:
    """The 4-scan series (``scan0.nii.gz`` = baseline, then follow-ups 1-3) and the baseline labelmap
    (``lesions.nii.gz``) written to ``folder``: the scans' paths and the labelmap's."""
    paths = []
    for time_point in range(4):
        nodules = [truth(time_point, n) for n in range(3) if RADII_MM[time_point][n] > 0]
        paths.append(str(folder / f"scan{time_point}.nii.gz"))
        write_volume(lung_with_nodules(GEOMETRY, nodules, seed=time_point), paths[-1])
    lesions = labelmap_volume([(ball(GEOMETRY, *truth(0, n)), n + 1) for n in range(3)], GEOMETRY)
    write_volume(lesions, folder / "lesions.nii.gz")
    return paths, str(folder / "lesions.nii.gz")


@pytest.fixture(scope="module")
def series_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    return folder, *write_series(folder)


def assert_series_outputs(out: Path, route: str) -> tuple[list[dict], list[dict]]:
    """What every way of running the series (command, worker, server, batch) writes into ``out`` with
    ``route``: the files, one row per lesion and time point with the truth's volumes and centres, lesion
    2 reported gone at every follow-up, the routes kept, the RECIST responses, the labelmaps and the
    report. Returns the rows of lesions.csv and response.csv."""
    with (out / "lesions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (out / "response.csv").open() as handle:
        responses = list(csv.DictReader(handle))
    expected_files = {*FILES.values(), *(labelmap_name(k) for k in (1, 2, 3))}
    assert expected_files <= {path.name for path in out.iterdir()}
    assert list(rows[0]) == CSV_COLUMNS and list(responses[0]) == RESPONSE_COLUMNS

    assert [(row["label"], row["time_point"]) for row in rows] == [(str(n), str(t)) for n in (1, 2, 3)
                                                                   for t in range(4)]
    by_lesion = {n: [row for row in rows if row["label"] == str(n)] for n in (1, 2, 3)}
    assert [row["target"] for row in rows if row["time_point"] == "0"] == ["1", "1", "0"]
    assert [row["scan"] for row in by_lesion[1]] == [f"scan{t}.nii.gz" for t in range(4)]
    for t, row in enumerate(by_lesion[1]):  # shrinks to 0.36x, then grows to 2.1x its baseline volume
        centre, radius = truth(t, 0)
        assert float(row["volume_ml"]) == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.25)
        assert np.linalg.norm([float(row[axis]) - c for axis, c in zip("lps", centre)]) < 1.5
        assert row["status"] == "ok"
    assert float(by_lesion[1][3]["volume_change_pct"]) > 80
    assert by_lesion[2][0]["status"] == "ok" and float(by_lesion[2][0]["diameter_long_mm"]) > 10
    for row in by_lesion[2][1:]:  # gone: reported at every follow-up, measured 0
        assert "not_found" in row["status"].split(";")
        assert float(row["volume_ml"]) == 0 and row["diameter_long_mm"] == "nan"
        assert row["l"] != "nan"
    expected_routes = {"chained": ["", "direct", "chained", "chained"], "direct": ["", "direct", "direct", "direct"],
                       "auto": ["", "direct", "direct", "direct"]}[route]
    assert [row["route"] for row in by_lesion[1]] == expected_routes
    assert (by_lesion[1][2]["routes_apart_mm"] != "nan") == (route == "auto")

    assert [row["response"] for row in responses] == ["baseline", "PR", "PR", "PD"]
    sld = [float(row["sld_mm"]) for row in responses]
    assert sld[0] == pytest.approx(float(by_lesion[1][0]["diameter_long_mm"])
                                   + float(by_lesion[2][0]["diameter_long_mm"]), abs=0.01)
    assert sld[1:] == [pytest.approx(float(row["diameter_long_mm"]), abs=0.01) for row in by_lesion[1][1:]]
    assert float(responses[3]["nadir_mm"]) == pytest.approx(sld[1], abs=0.01)

    for t in (1, 2, 3):
        labels = read_volume(out / labelmap_name(t))
        assert labels.geometry.same_grid(GEOMETRY)
        assert set(np.unique(labels.voxels)) == {0, 1, 3}
        assert dice(labels.voxels == 1, ball(GEOMETRY, *truth(t, 0))) > 0.85
    report = (out / "report.md").read_text()
    assert "| T3 | scan3.nii.gz |" in report and "| PD |" in report and "Eur J Cancer 2009;45:228-247" in report
    assert "- 2 at T1: not found in the follow-up" in report
    for picture in ("growth.png", "lesions.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows, responses


@pytest.mark.parametrize("route", ["chained", "direct", "auto"])
def test_series_through_the_command(series_files, route, tmp_path, monkeypatch):
    from MedDIFTLib.cli import track

    extracted = []
    build = track.featurizer_from_args

    def counting_featurizer(args, device):
        featurizer = build(args, device)
        extract = featurizer.extract
        monkeypatch.setattr(featurizer, "extract", lambda volume, progress: extracted.append(volume.name)
                            or extract(volume, progress))
        return featurizer

    monkeypatch.setattr(track, "featurizer_from_args", counting_featurizer)
    _, scans, lesions = series_files
    assert main(["track", *scans, "--lesions", lesions, "--out", str(tmp_path), "--series", route, *FAST]) == 0
    assert extracted == [f"scan{t}.nii.gz" for t in range(4)]  # each scan's features once, whatever the route
    assert {path.name for path in tmp_path.iterdir()} == {*FILES.values(), *(labelmap_name(k) for k in (1, 2, 3))}
    assert_series_outputs(tmp_path, route)


def test_one_followup_keeps_the_pair_outputs_and_bad_series_input_writes_nothing(series_files, tmp_path, capsys):
    folder, scans, lesions = series_files
    assert main(["track", scans[0], scans[1], "--lesions", lesions, "--out", str(tmp_path / "pair"), "--series",
                 "chained", "--max-targets", "2", *FAST]) == 0
    assert {path.name for path in (tmp_path / "pair").iterdir()} == set(PAIR_FILES.values())
    assert "note: --series, --max-targets only act with several follow-ups" in capsys.readouterr().err

    mri = Volume(np.full(GEOMETRY.shape_kji, 300.0, np.float32), GEOMETRY)
    write_volume(mri, folder / "mri.nii.gz")
    out = tmp_path / "bad"
    assert main(["track", scans[0], str(folder / "mri.nii.gz"), "--lesions", lesions, "--out", str(out),
                 *FAST]) == 2  # one follow-up: its modality is checked too
    assert "another modality" in capsys.readouterr().err
    assert main(["track", scans[0], scans[1], str(folder / "mri.nii.gz"), "--lesions", lesions, "--out", str(out),
                 *FAST]) == 2
    assert "another modality" in capsys.readouterr().err
    assert main(["track", scans[0], scans[1], str(folder / "missing.nii.gz"), "--lesions", lesions, "--out",
                 str(out), *FAST]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "taken").mkdir()
    write_volume(read_volume(scans[2]), tmp_path / "taken" / labelmap_name(2))
    assert main(["track", scans[0], scans[1], str(tmp_path / "taken" / labelmap_name(2)), "--lesions", lesions,
                 "--out", str(tmp_path / "taken"), *FAST]) == 2
    assert "is the input FOLLOWUP 2" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "taken").iterdir()] == [labelmap_name(2)]
    with pytest.raises(SystemExit):  # no follow-up at all: argparse's usage error
        main(["track", scans[0], "--lesions", lesions, "--out", str(out)])


def test_a_lesion_that_leaves_the_field_of_view_is_reported_and_its_time_point_not_evaluable(series_files):
    """Follow-up 2 is cropped above S = 10 mm: lesion 3 (S = 18 mm) is outside it."""
    from MedDIFTLib.core.options import FieldLevel, FieldOptions
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.lesions.inputs import lesions_from_labelmap
    from MedDIFTLib.lesions.series import track_series

    _, scans, lesions_path = series_files
    baseline, first, second = (read_volume(path) for path in scans[:3])
    cropped = Geometry.create((40, 36, 16), GEOMETRY.spacing_mm, GEOMETRY.origin_lps_mm)
    second = Volume(second.voxels[:16].copy(), cropped, "cropped")
    featurizer = create_featurizer("mind", device="cpu")
    fast = FieldOptions(levels=(FieldLevel(spacing_mm=8.0, search_radius_mm=12.0),), optimise_iterations=0)
    result = track_series(baseline, [first, second], lesions_from_labelmap(read_volume(lesions_path), baseline),
                          featurizer.extract, series_options=SeriesOptions(route="direct", measurable_mm=8.0),
                          field_options=fast)
    assert result.targets == [1, 2, 3]
    assert [visit.status for visit in result.timeline(3)[:2]] == ["ok", "ok"]
    assert "leaves_volume" in result.timeline(3)[2].flags and not result.timeline(3)[2].evaluable
    assert result.timeline(3)[2].gone and result.labelmaps[2].shape == cropped.shape_kji
    assert result.timeline(1)[2].status == "ok"
    assert [response.category for response in result.responses] == [None, "PR", "NE"]


def _visits_and_labelmaps(result) -> tuple:
    """Everything a series result reports, comparable with ``==`` (arrays as bytes, NaN as a string)."""
    def number(value: float) -> object:
        return "nan" if math.isnan(value) else value

    visits = [(visit.label, visit.time_point, visit.centre_lps_mm.tobytes(), number(visit.confidence),
               number(visit.forward_backward_mm), repr(visit.measurement), visit.flags, visit.route,
               number(visit.routes_apart_mm)) for visits in result.visits for visit in visits]
    return (visits, [labelmap.tobytes() for labelmap in result.labelmaps], result.targets,
            [repr(response) for response in result.responses])


def test_routes_sharing_their_pairs_give_what_each_gives_alone(series_files, monkeypatch):
    """One PairRuns for the three routes: each route's result is the same as run alone, and the pairs
    they share (baseline -> T1, the direct pairs, T1 -> T2) run once."""
    from MedDIFTLib.core.options import FieldLevel, FieldOptions
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.lesions import series as series_module
    from MedDIFTLib.lesions.inputs import lesions_from_labelmap

    _, paths, lesions_path = series_files
    scans = [read_volume(path) for path in paths]
    lesions = lesions_from_labelmap(read_volume(lesions_path), scans[0])
    featurizer = create_featurizer("mind", device="cpu")
    fast = FieldOptions(levels=(FieldLevel(spacing_mm=8.0, search_radius_mm=12.0),), optimise_iterations=0)
    runs = []
    track = series_module.track_lesions
    monkeypatch.setattr(series_module, "track_lesions",
                        lambda *args, **kwargs: runs.append(1) or track(*args, **kwargs))

    def route_results(pairs_for) -> dict[str, tuple]:
        return {route: _visits_and_labelmaps(series_module.track_series(
            scans[0], scans[1:], lesions, featurizer.extract, series_options=SeriesOptions(route=route),
            field_options=fast, pairs=pairs_for(route))) for route in ("chained", "direct", "auto")}

    alone = route_results(lambda route: None)
    assert len(runs) == 3 + 3 + 5
    shared_pairs = series_module.PairRuns()
    runs.clear()
    shared = route_results(lambda route: shared_pairs)
    assert shared == alone
    assert len(runs) == len(shared_pairs.results) <= 6  # 0->1, 0->2, 0->3, 1->2, and 2->3 from each chain
    assert shared_pairs.reused_seconds > 0
    with pytest.raises(ValueError, match="other scans"):
        series_module.track_series(scans[0], scans[1:3], lesions, featurizer.extract, pairs=shared_pairs)
