"""Nothing silently wrong on the command line: no output may overwrite an input, a symbolic link
is written through, a job over the memory budget or the point cap is refused before any work with
the option to change, a corrupt input is refused, and every misuse ends with one line and exit 2."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from MedDIFTLib.cli import main
from MedDIFTLib.core import budget
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import PointSet, read_points, write_points
from MedDIFTLib.core.options import FieldOptions
from MedDIFTLib.worker.protocol.requests import Limits

SIZE = 40  # voxels per axis, 1.5 mm


def _phantom(shift_voxels: int = 0) -> np.ndarray:
    """A body (soft tissue with lung-like holes and bright spots) in air, int16 HU, ``[k, j, i]``."""
    rng = np.random.default_rng(7)
    k, j, i = np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")
    centre = SIZE / 2
    body = (k - centre) ** 2 + (j - centre) ** 2 + (i - centre - shift_voxels) ** 2 < 17**2
    values = np.where(body, 40.0, -1000.0)
    for _ in range(12):
        spot = rng.uniform(10, 30, 3)
        values[(k - spot[0]) ** 2 + (j - spot[1]) ** 2 + (i - spot[2] - shift_voxels) ** 2 < 9] = rng.choice(
            [-800.0, 300.0])
    return (values + rng.normal(0, 5, values.shape)).astype(np.int16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    for name, shift in (("fixed.nii.gz", 0), ("moving.nii.gz", 2)):
        image = sitk.GetImageFromArray(_phantom(shift))
        image.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(image, str(folder / name), True)
    points = PointSet([[30.0, 30.0, 30.0], [20.0, 35.0, 25.0], [35.0, 25.0, 32.0]], ["a", "b", "c"])
    write_points(points, folder / "points.csv")
    return folder


def _run(arguments, capsys) -> tuple[int, str]:
    code = main(arguments)
    return code, capsys.readouterr().err.strip()


def _one_line(code: int, error: str, message: str) -> None:
    assert code == 2, error
    assert len(error.splitlines()) == 1 and error.startswith("meddift: error:") and message in error, error


# ------------------------------------------------------------------ outputs never overwrite inputs


@pytest.mark.parametrize("flag", ["--out-transform", "--out-warped"])
def test_register_refuses_an_output_that_is_an_input(pair, tmp_path, capsys, flag):
    fixed = tmp_path / "fixed.nii.gz"
    fixed.write_bytes((pair / "fixed.nii.gz").read_bytes())
    before = fixed.read_bytes()
    outputs = {"--out-transform": str(tmp_path / "field.nii.gz"), flag: str(fixed)}
    arguments = ["register", str(fixed), str(pair / "moving.nii.gz"), "--quiet"]
    for name, path in outputs.items():
        arguments += [name, path]
    code, error = _run(arguments, capsys)
    _one_line(code, error, f"{flag} {fixed} is the input FIXED")
    assert fixed.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nii.gz"]


def test_match_refuses_to_write_over_its_points_by_a_hard_link_or_a_symbolic_link(pair, tmp_path, capsys):
    points = tmp_path / "points.csv"
    points.write_bytes((pair / "points.csv").read_bytes())
    before = points.read_bytes()
    hard = tmp_path / "hard.csv"
    os.link(points, hard)
    soft = tmp_path / "soft.csv"
    soft.symlink_to(points)
    for out in (points, hard, soft, tmp_path / "sub" / ".." / "points.csv"):
        code, error = _run(["match", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--points", str(points),
                            "--out", str(out), "--quiet"], capsys)
        _one_line(code, error, "is the input --points")
        assert points.read_bytes() == before


def test_register_refuses_two_outputs_on_one_file(pair, tmp_path, capsys):
    out = tmp_path / "field.nii.gz"
    code, error = _run(["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--out-transform",
                        str(out), "--out-inverse", str(tmp_path / "." / "field.nii.gz"), "--quiet"], capsys)
    _one_line(code, error, "name the same file")
    assert not any(tmp_path.iterdir())


def test_track_refuses_an_output_folder_that_would_overwrite_its_lesions(pair, tmp_path, capsys):
    lesions = tmp_path / "lesions.csv"
    write_points(PointSet([[30.0, 30.0, 30.0]], ["1"]), lesions)
    before = lesions.read_bytes()
    code, error = _run(["track", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--lesions", str(lesions),
                        "--out", str(tmp_path), "--quiet"], capsys)
    _one_line(code, error, "is the input --lesions")
    assert lesions.read_bytes() == before


def test_a_symbolic_link_output_is_written_through_to_its_target(pair, tmp_path, capsys):
    """The link stays a link; the file it points to gets the result (README: "written through")."""
    target = tmp_path / "results" / "matched.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "matched.csv"
    link.symlink_to(target)
    code, error = _run(["match", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--points",
                        str(pair / "points.csv"), "--out", str(link), "--quiet", "--search-radius-mm", "6"], capsys)
    assert code == 0, error
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_points(target).labels == ["a", "b", "c"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["matched.csv"]


# ------------------------------------------------------------------ corrupt inputs


def test_match_refuses_a_truncated_volume_with_one_line(pair, tmp_path, capsys):
    data = (pair / "moving.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "matched.csv"
    code, error = _run(["match", str(pair / "fixed.nii.gz"), str(cut), "--points", str(pair / "points.csv"),
                        "--out", str(out), "--quiet"], capsys)
    _one_line(code, error, "cut.nii.gz: the compressed file is damaged or truncated")
    assert not out.exists()


# ------------------------------------------------------------------ memory and points bounded


def _register_estimate(pair, spacing_mm: float) -> int:
    geometry = Geometry.create((SIZE,) * 3, (1.5,) * 3)
    options = FieldOptions().with_level_knobs(spacing_mm=spacing_mm)  # as --grid-spacing-mm sets it
    return budget.estimate_register(geometry, geometry, options).total_bytes


def test_register_over_the_memory_budget_is_refused_before_any_work_naming_the_flag(pair, tmp_path, capsys,
                                                                                     monkeypatch):
    """The budget sits between a coarse lattice's estimate and a fine one's: only the fine one is refused."""
    coarse, fine = _register_estimate(pair, 6.0), _register_estimate(pair, 3.0)
    assert fine > 2 * coarse - budget.BASE_BYTES  # the lattice's tables are what grows
    monkeypatch.setenv(budget.BUDGET_ENVIRONMENT, str((coarse + fine) / 2 / 2**20))
    out = tmp_path / "field.nii.gz"
    common = ["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--out-transform", str(out),
              "--quiet", "--optimise-iterations", "0"]
    code, error = _run([*common, "--grid-spacing-mm", "3"], capsys)
    _one_line(code, error, f"register would need about {budget.describe_bytes(fine)} of memory")
    assert "use a coarser lattice (--grid-spacing-mm, now 3 mm)" in error and budget.BUDGET_ENVIRONMENT in error
    assert not out.exists()
    code, error = _run([*common, "--grid-spacing-mm", "6"], capsys)
    assert code == 0 and out.exists(), error


def test_the_command_line_caps_points_as_the_server_does(pair, tmp_path, capsys, monkeypatch):
    assert budget.MAX_POINTS == Limits().max_points == 100_000
    monkeypatch.setattr(budget, "MAX_POINTS", 2)
    out = tmp_path / "matched.csv"
    code, error = _run(["match", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--points",
                        str(pair / "points.csv"), "--out", str(out), "--quiet"], capsys)
    _one_line(code, error, "points.csv: 3 points exceed the limit of 2 per job")
    assert not out.exists()


# ------------------------------------------------------------------ misuse: one line, exit 2


def test_server_misuse_is_one_line_before_any_work(pair, tmp_path, capsys):
    common = ["match", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--points", str(pair / "points.csv"),
              "--out", str(tmp_path / "m.csv"), "--quiet"]
    code, error = _run([*common, "--server", "http://127.0.0.1:99999"], capsys)
    _one_line(code, error, "with a port from 1 to 65535")
    code, error = _run([*common, "--server", "https://127.0.0.1:8765", "--ca-file", str(tmp_path / "absent.pem")],
                       capsys)
    _one_line(code, error, "absent.pem: cannot use as the server's certificate (No such file or directory)")
    not_a_certificate = tmp_path / "notes.pem"
    not_a_certificate.write_text("hello")
    code, error = _run([*common, "--server", "https://127.0.0.1:8765", "--ca-file", str(not_a_certificate)], capsys)
    _one_line(code, error, "notes.pem: cannot use as the server's certificate")
    assert not any(path.name == "m.csv" for path in tmp_path.iterdir())


def test_serve_refuses_a_missing_or_mismatched_tls_key_before_serving(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not available to make a test certificate")
    for name in ("one", "two"):
        key, certificate = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
                       check=True, capture_output=True, timeout=60)
    code, error = _run(["serve", "--port", "1", "--tls-cert", str(tmp_path / "one.crt"), "--tls-key",
                        str(tmp_path / "absent.key")], capsys)
    _one_line(code, error, "absent.key: no such file")
    code, error = _run(["serve", "--port", "1", "--tls-cert", str(tmp_path / "one.crt"), "--tls-key",
                        str(tmp_path / "two.key")], capsys)
    _one_line(code, error, "cannot be used together")
    assert "serving" not in capsys.readouterr().out
