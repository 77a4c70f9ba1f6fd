"""benchmarks/full_resolution.py (issue 30) without registering anything: the TRE summary, the choice of
points in new regions, the table against the issue's goals (one engine and an A/B pair), and a clean skip
when the POPI CT is absent."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import full_resolution  # noqa: E402


def test_tre_summary_is_the_mean_and_p95_distance():
    truth = np.zeros((20, 3))
    moved = np.zeros((20, 3))
    moved[:, 2] = np.arange(20)
    summary = full_resolution.tre_summary(moved, truth)
    assert summary["mean"] == 9.5
    assert summary["p95"] == np.percentile(np.arange(20), 95)


def test_spread_points_start_at_the_centre_and_go_far_apart():
    points = np.array([[0.0, 0, 0], [-100, 0, 0], [100, 0, 0], [0, 100, 0], [0, -100, 0], [1, 0, 0]])
    chosen = full_resolution.spread_points(points, 3)
    assert chosen == [0, 1, 2, 3]  # the centre, then the far points, never the one beside the centre
    assert full_resolution.spread_points(points[:2], 5) == [0, 1]  # never more points than there are


def test_goal_cells():
    assert full_resolution.goal_cell(19.9, 20.0) == "yes"
    assert full_resolution.goal_cell(20.1, 20.0) == "no"
    assert full_resolution.goal_cell(5.0, None) == ""
    assert full_resolution.goal_cell(None, 20.0) == ""


def _figures(wall_s: float, tre_mm: float) -> dict:
    return {"register": {"wall_s": wall_s, "cpu_s": 2 * wall_s, "peak_gb": 5.2, "tre_mean_mm": tre_mm,
                         "tre_p95_mm": 2 * tre_mm},
            "worker": {"new_point_ms": 67.0, "filled_share": 0.25, "cached_1_ms": 5.0}}


def test_table_puts_each_figure_beside_its_goal():
    table = full_resolution.markdown({"this checkout": _figures(80.0, 0.52)})
    lines = table.splitlines()
    assert lines[0] == "| step | figure | this checkout | goal (issue 30) | goal met |"
    assert "| register | wall s | 80.0 | <= 20 | no |" in lines
    assert "| register | peak RSS GB | 5.20 | <= 4 | no |" in lines
    assert "| register | mean TRE mm | 0.52 | <= before + 0.02 (A/B) |  |" in lines
    assert "| worker | features filled when those points were done % | 25 |  |  |" in lines
    assert "| worker | cached re-match, 1 pt per request, ms/pt | 5.0 | <= 10 | yes |" in lines
    assert not any(line.startswith("| track |") for line in lines)  # a step not run has no rows


def test_ab_table_checks_accuracy_against_the_baseline():
    table = full_resolution.markdown({"this checkout": _figures(15.0, 0.53), "baseline old": _figures(80.0, 0.52)})
    lines = table.splitlines()
    assert lines[0] == "| step | figure | this checkout | baseline old | goal (issue 30) | goal met |"
    assert "| register | wall s | 15.0 | 80.0 | <= 20 | yes |" in lines
    assert "| register | mean TRE mm | 0.53 | 0.52 | <= baseline old + 0.02 | yes |" in lines
    assert "| register | p95 TRE mm | 1.06 | 1.04 | <= baseline old + 0.02 | yes |" in lines
    worse = full_resolution.markdown({"this checkout": _figures(15.0, 0.60), "baseline old": _figures(80.0, 0.52)})
    assert "| register | mean TRE mm | 0.60 | 0.52 | <= baseline old + 0.02 | no |" in worse.splitlines()


def test_absent_ct_is_skipped_cleanly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(full_resolution, "image_path", lambda case: tmp_path / "absent.nii.gz")
    results = tmp_path / "results.json"
    assert full_resolution.main(["--results", str(results)]) == 0
    assert "not found" in capsys.readouterr().err
    assert not results.exists()
