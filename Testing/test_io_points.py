"""Point files: every format round-trips positions (LPS mm) and labels; RAS is converted."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DIRLAB_DIR, require

from MedDIFTLib.core.environment import PACKAGE_PARENT
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import PointSet, read_dirlab_points, read_points, write_points
from MedDIFTLib.evaluation.metrics import tre_stats

POINTS = PointSet(
    np.array([[-12.5, 40.25, 101.0], [3.0, -7.5, 88.125], [0.0, 0.0, 0.0]]),
    ["carina", "apex, left", "F-3"],
    ["", "described", ""],
    unreliable=np.array([False, True, False]),
    attributes={"confidence": np.array([0.9, 0.2, 0.75])},
)


@pytest.mark.parametrize("name", ["points.mrk.json", "points.fcsv", "points.csv"])
def test_round_trip_keeps_positions_and_labels(tmp_path, name):
    path = tmp_path / name
    write_points(POINTS, path)
    loaded = read_points(path)
    np.testing.assert_allclose(loaded.points_lps_mm, POINTS.points_lps_mm, atol=1e-6)
    assert loaded.labels == POINTS.labels
    assert loaded.descriptions == POINTS.descriptions


def test_markups_written_in_lps_with_unreliable_unselected(tmp_path):
    path = tmp_path / "out.mrk.json"
    write_points(POINTS, path)
    markup = json.loads(path.read_text())["markups"][0]
    assert markup["coordinateSystem"] == "LPS"
    assert [p["selected"] for p in markup["controlPoints"]] == [True, False, True]


def test_markups_in_ras_are_converted(tmp_path):
    path = tmp_path / "ras.mrk.json"
    document = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                             "controlPoints": [{"label": "A", "position": [10.0, 20.0, 30.0]}]}]}
    path.write_text(json.dumps(document))
    loaded = read_points(path)
    np.testing.assert_allclose(loaded.points_lps_mm, [[-10.0, -20.0, 30.0]])
    assert loaded.labels == ["A"]


def test_fcsv_without_coordinate_system_is_ras(tmp_path):
    path = tmp_path / "old.fcsv"
    path.write_text("# Markups fiducial file version = 4.6\n"
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                    "vtkMRMLMarkupsFiducialNode_0,1.5,-2,3,0,0,0,1,1,1,0,F-1,,\n")
    loaded = read_points(path)
    np.testing.assert_allclose(loaded.points_lps_mm, [[-1.5, 2.0, 3.0]])
    assert loaded.labels == ["F-1"]


def test_csv_columns(tmp_path, oblique_geometry):
    ras = tmp_path / "ras.csv"
    ras.write_text("label,r,a,s\nP1,1,2,3\n")
    np.testing.assert_allclose(read_points(ras).points_lps_mm, [[-1.0, -2.0, 3.0]])
    voxel = tmp_path / "voxel.csv"
    voxel.write_text("x,y,z\n1.5,2,3\n")
    loaded = read_points(voxel, oblique_geometry)
    np.testing.assert_allclose(loaded.points_lps_mm, oblique_geometry.ijk_to_lps([[1.5, 2.0, 3.0]]))
    assert loaded.labels == ["1"]
    with pytest.raises(BadInputError, match="need the volume"):
        read_points(voxel)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(BadInputError, match="CSV header"):
        read_points(bad)


@pytest.mark.parametrize("content", ["", "label,l,p,s\n"])
def test_empty_point_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(BadInputError):
        read_points(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "points.xyz"
    path.write_text("1 2 3\n")
    with pytest.raises(BadInputError, match="unknown point format"):
        read_points(path)
    with pytest.raises(BadInputError, match="unknown point format"):
        write_points(POINTS, path)


def test_dirlab_txt_is_one_based(tmp_path):
    path = tmp_path / "case_300_T00_xyz.txt"
    path.write_text("1\t1\t1\n11\t21\t3\n")
    geometry = Geometry.create((256, 256, 94), (0.97, 0.97, 2.5))
    loaded = read_points(path, geometry)
    np.testing.assert_allclose(loaded.points_lps_mm, [[0.0, 0.0, 0.0], [9.7, 19.4, 5.0]])


@pytest.mark.parametrize("case, expected_mm", [(1, 3.89), (2, 4.34)])
def test_dirlab_initial_distance(tmp_path, case, expected_mm):
    """The real DIR-Lab landmarks, written back in the published 1-based txt layout, give the
    published mean initial distance."""
    folder = require(DIRLAB_DIR / f"case{case}")
    meta = json.loads((folder / "meta.json").read_text())
    geometry = Geometry.create(meta["image_dims_xyz"], meta["spacing_mm_xyz"])
    phases = []
    for phase in ("T00", "T50"):
        zero_based = np.loadtxt(folder / f"case{case}_{phase}_landmarks.csv", delimiter=",", skiprows=1)
        txt = tmp_path / f"Case{case}_300_{phase}_xyz.txt"
        np.savetxt(txt, zero_based + 1, fmt="%d", delimiter="\t")
        phases.append(read_dirlab_points(txt, geometry))
    stats = tre_stats(phases[0].points_lps_mm, phases[1].points_lps_mm)
    assert stats["count"] == 300
    assert round(stats["mean"], 2) == expected_mm


def test_csv_saved_by_excel_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefflabel,l,p,s\r\napex,1.5,-2,30\r\n".encode())
    loaded = read_points(path)
    assert loaded.labels == ["apex"]
    np.testing.assert_allclose(loaded.points_lps_mm, [[1.5, -2.0, 30.0]])


def test_voxel_columns_holding_millimetres_get_a_hint(tmp_path, oblique_geometry):
    path = tmp_path / "mm_in_xyz.csv"
    path.write_text("label,x,y,z\na,-120.5,80.25,-300\n")
    with pytest.raises(BadInputError, match="x,y,z are 0-based voxel indices.*l,p,s"):
        read_points(path, oblique_geometry)


def test_voxel_and_world_columns_must_agree(tmp_path, oblique_geometry):
    ijk = np.array([[1.0, 2.0, 3.0]])
    lps = oblique_geometry.ijk_to_lps(ijk)[0]
    agreeing = tmp_path / "both.csv"
    agreeing.write_text(f"x,y,z,l,p,s\n1,2,3,{lps[0]},{lps[1]},{lps[2]}\n")
    np.testing.assert_allclose(read_points(agreeing, oblique_geometry).points_lps_mm, [lps], atol=1e-9)
    disagreeing = tmp_path / "disagree.csv"
    disagreeing.write_text(f"x,y,z,l,p,s\n1,2,3,{lps[0] + 5},{lps[1]},{lps[2]}\n")
    with pytest.raises(BadInputError, match="disagree on 1 of 1 points"):
        read_points(disagreeing, oblique_geometry)


@pytest.mark.parametrize("name", ["dup.csv", "dup.mrk.json", "dup.fcsv"])
def test_duplicate_labels_are_refused_in_every_format(tmp_path, name):
    path = tmp_path / name
    write_points(PointSet(np.zeros((3, 3)), ["a", "b", "a"]), path)
    with pytest.raises(BadInputError, match="labels must be unique.*repeated: a"):
        read_points(path)


def _markups(control_points, lists=1):
    markup = {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": control_points}
    return {"markups": [dict(markup, name=f"list{n}") for n in range(lists)]}


def test_unplaced_markups_are_skipped_with_a_note(tmp_path):
    path = tmp_path / "partly.mrk.json"
    points = [
        {"label": "placed", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"},
        {"label": "later", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
    ]
    path.write_text(json.dumps(_markups(points)))
    loaded = read_points(path)
    assert loaded.labels == ["placed"]
    assert len(loaded.notes) == 1 and "'later'" in loaded.notes[0] and "not placed" in loaded.notes[0]


def test_a_second_markup_list_is_not_ignored_silently(tmp_path):
    path = tmp_path / "two.mrk.json"
    path.write_text(json.dumps(_markups([{"label": "a", "position": [1.0, 2.0, 3.0]}], lists=2)))
    with pytest.raises(BadInputError, match="holds 2 markup lists.*one list per file"):
        read_points(path)


def test_non_ascii_labels_round_trip_under_an_ascii_locale(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from MedDIFTLib.core.io import PointSet, read_points, write_points\n"
        "assert sys.getfilesystemencoding() and __import__('locale').getpreferredencoding(False).lower() != 'utf-8'\n"
        "label = 'L\\u00e4sion rechts'\n"
        "for name in ('p.csv', 'p.mrk.json', 'p.fcsv'):\n"
        "    write_points(PointSet(np.zeros((1, 3)), [label]), sys.argv[1] + '/' + name)\n"
        "    assert read_points(sys.argv[1] + '/' + name).labels == [label]\n"
    )
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
                   "PYTHONPATH": PACKAGE_PARENT}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=environment, capture_output=True,
                          text=True, encoding="utf-8", timeout=120, check=False)
    assert done.returncode == 0, done.stderr
