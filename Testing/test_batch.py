"""``meddift batch`` on Dask: a LocalCluster of two worker processes (and a scheduler and workers started
as separate processes on 127.0.0.1), tiny synthetic volumes and the weight-free MIND backbone; a lesion
series as one row (the 4-scan series of test_lesion_series)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from MedDIFTLib.batch import BatchJob, FeatureRecipe, dask_client, read_manifest, run_batch
from MedDIFTLib.batch.summary import read_summary
from MedDIFTLib.cli import main
from MedDIFTLib.core.environment import child_environment
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import PointSet, Volume, read_points, write_points, write_volume
from MedDIFTLib.core.options import FieldLevel, FieldOptions, MatchOptions, SeriesOptions

SHAPE_IJK = (26, 24, 22)
SPACING_MM = (2.0, 2.0, 2.0)
SHIFTS_MM = [(2.0, -2.0, 0.0), (0.0, 2.0, 2.0), (-2.0, 0.0, 2.0), (2.0, 2.0, -2.0)]
MATCH = ["--backbone", "mind", "--device", "cpu", "--match-search-radius-mm", "8"]
TIMEOUT_S = 120


def _texture(seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=SHAPE_IJK[::-1])
    return (ndimage.gaussian_filter(noise, 1.5) * 4000.0 - 200.0).astype(np.float32)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """One baseline and four follow-ups (the baseline's voxels placed ``SHIFTS_MM`` away, plus noise), with
    fixed points and their true moving positions, and a manifest of the four pairs."""
    folder = tmp_path_factory.mktemp("series")
    voxels = _texture(0)
    geometry = Geometry.create(SHAPE_IJK, SPACING_MM, (0.0, 0.0, 0.0), np.eye(3))
    write_volume(Volume(voxels, geometry), folder / "baseline.nii.gz")
    ijk = np.array([[8, 8, 8], [13, 12, 11], [17, 15, 12], [10, 16, 13], [15, 9, 10]], float)
    fixed_points = PointSet(geometry.ijk_to_lps(ijk), [f"P{n}" for n in range(len(ijk))])
    write_points(fixed_points, folder / "points.csv")
    lines = ["id,fixed,moving,points,moving_points"]
    for number, shift in enumerate(SHIFTS_MM):
        noisy = voxels + np.random.default_rng(number + 1).normal(0, 20, voxels.shape).astype(np.float32)
        moved = Geometry.create(SHAPE_IJK, SPACING_MM, shift, np.eye(3))
        write_volume(Volume(noisy, moved), folder / f"followup{number}.nii.gz")
        truth = PointSet(fixed_points.points_lps_mm + shift, fixed_points.labels)
        write_points(truth, folder / f"truth{number}.csv")
        lines.append(f"pair{number},baseline.nii.gz,followup{number}.nii.gz,points.csv,truth{number}.csv")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def client():
    with dask_client("local", workers=2, threads_per_worker=1, memory_limit="2GB") as connected:
        yield connected


def _job(task: str = "match") -> BatchJob:
    return BatchJob(task=task, recipe=FeatureRecipe("mind", {}, "cpu"),
                    match_options=MatchOptions(search_radius_mm=8.0))


def _matched(path: Path) -> np.ndarray:
    return read_points(path).points_lps_mm


def test_manifest_rows_equal_the_single_pair_command(series, client, tmp_path):
    out = tmp_path / "batch"
    records = run_batch(read_manifest(series / "manifest.csv"), _job(), out, client)
    assert [record["status"] for record in records] == ["ok"] * 4
    assert {record["worker"] for record in records} and all(record["tre_mean_mm"] < 1.0 for record in records)
    for number in range(4):
        single = tmp_path / f"single{number}.csv"
        assert main(["match", str(series / "baseline.nii.gz"), str(series / f"followup{number}.nii.gz"), "--points",
                     str(series / "points.csv"), "--out", str(single), "--quiet", "--backbone", "mind",
                     "--device", "cpu", "--search-radius-mm", "8"]) == 0
        batch_points, single_points = read_points(out / f"pair{number}" / "matched.csv"), read_points(single)
        assert batch_points.labels == single_points.labels
        np.testing.assert_allclose(batch_points.points_lps_mm, single_points.points_lps_mm, atol=1e-4)
        assert batch_points.descriptions == single_points.descriptions
        # the Dask worker's torch thread count differs, and the FFT scoring rounds differently per thread count
        assert_same_table(out / f"pair{number}" / "matched.csv", single, 1e-4)
    summary = read_summary(out / "summary.csv")
    assert [line["id"] for line in summary] == [f"pair{n}" for n in range(4)]
    assert all(float(line["tre_mean_mm"]) < 1.0 and float(line["peak_rss_mb"]) > 0 for line in summary)
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())


def assert_same_table(path, reference, tolerance):
    """Same header and text cells; numeric cells within ``tolerance``."""
    rows, expected = (list(csv.reader(p.read_text(encoding="utf-8").splitlines())) for p in (path, reference))
    assert len(rows) == len(expected) and rows[0] == expected[0]
    for row, want in zip(rows[1:], expected[1:]):
        for cell, wanted in zip(row, want, strict=True):
            try:
                value, reference_value = float(cell), float(wanted)
            except ValueError:
                assert cell == wanted
                continue
            assert cell == wanted or abs(value - reference_value) <= tolerance, (cell, wanted)


def test_register_rows_write_the_register_outputs(series, client, tmp_path):
    manifest = tmp_path / "two.csv"
    manifest.write_text("\n".join((series / "manifest.csv").read_text().splitlines()[:3]).replace(
        "baseline.nii.gz", str(series / "baseline.nii.gz")).replace("followup", str(series / "followup")).replace(
        "points.csv", str(series / "points.csv")).replace("truth", str(series / "truth")) + "\n")
    job = BatchJob(task="register", recipe=FeatureRecipe("mind", {}, "cpu"),
                   field_options=FieldOptions(optimise_iterations=0))
    records = run_batch(read_manifest(manifest), job, tmp_path / "out", client)
    assert [record["status"] for record in records] == ["ok", "ok"]
    single = tmp_path / "single"
    assert main(["register", str(series / "baseline.nii.gz"), str(series / "followup0.nii.gz"), "--out-transform",
                 str(single / "transform.nii.gz"), "--points", str(series / "points.csv"), "--out-points",
                 str(single / "points.csv"), "--backbone", "mind", "--device", "cpu", "--optimise-iterations", "0",
                 "--quiet"]) == 0
    # The batch worker runs with its own torch thread count, and BLAS then sums in another order:
    # equal up to float32 rounding, not bit for bit.
    assert_same_table(tmp_path / "out" / "pair0" / "points.csv", single / "points.csv", tolerance=1e-4)
    for record in records:
        folder = tmp_path / "out" / record["id"]
        assert sorted(p.name for p in folder.iterdir()) == ["points.csv", "row.json", "transform.nii.gz",
                                                            "transform.nii.gz.json"]
        summary = json.loads((folder / "transform.nii.gz.json").read_text())
        assert summary["transform"] == "transform.nii.gz" and summary["backbone"] == "mind"


def test_a_bad_row_is_reported_and_the_others_complete(series, client, tmp_path):
    manifest = series / "bad.csv"
    text = (series / "manifest.csv").read_text().splitlines()
    text.insert(2, "missing,baseline.nii.gz,nowhere.nii.gz,points.csv,truth0.csv")
    text.insert(3, "far,baseline.nii.gz,followup1.nii.gz,far.csv,")
    (series / "far.csv").write_text("label,l,p,s\nF,5000,5000,5000\n")
    manifest.write_text("\n".join(text) + "\n")
    records = {record["id"]: record for record in run_batch(read_manifest(manifest), _job(), tmp_path, client)}
    assert records["missing"]["status"] == "failed" and "nowhere.nii.gz" in records["missing"]["error"]
    assert records["far"]["status"] == "failed" and records["far"]["kind"] == "bad_input"
    assert all(records[f"pair{n}"]["status"] == "ok" for n in range(4))
    assert not (tmp_path / "missing").exists() and not (tmp_path / "far").exists()
    lines = {line["id"]: line for line in read_summary(tmp_path / "summary.csv")}
    assert lines["far"]["status"] == "failed" and lines["far"]["error"]


def test_a_killed_worker_does_not_stop_the_batch(series, client, tmp_path):
    rows = read_manifest(series / "manifest.csv")
    pids = client.run(os.getpid)
    finished: list[dict] = []
    done = threading.Event()

    def batch() -> None:
        finished.extend(run_batch(rows, _job(), tmp_path, client))
        done.set()

    thread = threading.Thread(target=batch, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    busy: list[str] = []
    while not busy:
        assert time.monotonic() < deadline
        busy = [address for address, keys in client.processing().items() if keys]
        time.sleep(0.02)
    os.kill(pids[busy[0]], signal.SIGKILL)
    assert done.wait(TIMEOUT_S)
    assert [record["status"] for record in finished] == ["ok"] * 4
    client.wait_for_workers(2, timeout=TIMEOUT_S)


def _run_cli(series: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "MedDIFTLib", "batch", str(series / "manifest.csv"), "--out", str(out),
               "--workers", "1", "--quiet", *MATCH, *extra]
    return subprocess.Popen(command, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=_take_interrupts)


def _take_interrupts() -> None:
    """In the batch's process: SIGINT interrupts it even when the tests run as a background job of a
    shell, which starts them with SIGINT ignored (a setting every child inherits)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_batch_resumes_without_recomputing(series, tmp_path):
    out = tmp_path / "out"
    process = _run_cli(series, out)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (out / "pair0" / "row.json").is_file() and not (out / "pair1" / "row.json").is_file():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.05)
        published_before = {path.parent.name for path in out.glob("*/row.json")}
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    first = {path.parent.name: path.stat().st_mtime_ns for path in out.glob("*/row.json")}
    assert first and len(first) < 4
    assert all(sorted(p.name for p in (out / name).iterdir()) == ["matched.csv", "row.json"] for name in first)
    lines = {line["id"]: line["status"] for line in read_summary(out / "summary.csv")}
    assert {lines[name] for name in published_before} == {"ok"} and "pending" in lines.values()
    assert main(["batch", str(series / "manifest.csv"), "--out", str(out), "--workers", "2", "--quiet", *MATCH]) == 0
    after = {path.parent.name: path.stat().st_mtime_ns for path in out.glob("*/row.json")}
    assert len(after) == 4 and all(after[name] == first[name] for name in first)
    lines = {line["id"]: line["status"] for line in read_summary(out / "summary.csv")}
    assert {lines[name] for name in first} == {"done"} and set(lines.values()) <= {"done", "ok"}


def test_changed_options_rerun_the_rows(series, client, tmp_path):
    rows = read_manifest(series / "manifest.csv")[:1]
    assert run_batch(rows, _job(), tmp_path, client)[0]["status"] == "ok"
    assert run_batch(rows, _job(), tmp_path, client)[0]["status"] == "done"
    changed = BatchJob(task="match", recipe=FeatureRecipe("mind", {}, "cpu"),
                       match_options=MatchOptions(search_radius_mm=6.0))
    assert run_batch(rows, changed, tmp_path, client)[0]["status"] == "ok"


def test_a_scheduler_and_workers_started_by_hand(series, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    environment = child_environment()
    bin_dir = Path(sys.executable).parent
    processes = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                  env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not scheduler_file.is_file():
            assert time.monotonic() < deadline and processes[0].poll() is None
            time.sleep(0.1)
        for _ in range(2):
            processes.append(subprocess.Popen(
                [str(bin_dir / "dask"), "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                 "--host", "127.0.0.1", "--no-dashboard", "--no-nanny"], env=environment,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        with dask_client(str(scheduler_file)) as connected:
            connected.wait_for_workers(2, timeout=TIMEOUT_S)
            records = run_batch(read_manifest(series / "manifest.csv"), _job(), tmp_path / "out", connected)
        assert [record["status"] for record in records] == ["ok"] * 4
        assert len({record["worker"] for record in records}) >= 1
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    assert all(process.poll() is not None for process in processes)


def test_bad_manifests_are_refused_before_any_work(tmp_path):
    cases = {"fixed,points\na.nii.gz,p.csv\n": "lacks column(s) moving",
             "fixed,moving\n": "has no rows",
             "id,fixed,moving\nx,a,b\nx,a,c\n": "used twice",
             "id,fixed,moving\n../up,a,b\n": "must start with a letter or a digit",
             "fixed,moving\na.nii.gz,\n": "has no moving"}
    for number, (text, message) in enumerate(cases.items()):
        manifest = tmp_path / f"m{number}.csv"
        manifest.write_text(text)
        with pytest.raises(BadInputError, match=re.escape(message)):
            read_manifest(manifest)
    assert main(["batch", str(tmp_path / "m0.csv"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


def test_track_rows_equal_the_single_pair_command(series, client, tmp_path):
    geometry = Geometry.create(SHAPE_IJK, SPACING_MM, (0.0, 0.0, 0.0), np.eye(3))
    k, j, i = np.indices(geometry.shape_kji)
    labelmap = ((k - 11) ** 2 + (j - 12) ** 2 + (i - 13) ** 2 <= 9).astype(np.float32)
    write_volume(Volume(labelmap, geometry), tmp_path / "lesions.nii.gz")
    manifest = tmp_path / "track.csv"
    manifest.write_text(f"id,fixed,moving,lesions\nt0,{series / 'baseline.nii.gz'},{series / 'followup0.nii.gz'},"
                        "lesions.nii.gz\n")
    job = BatchJob(task="track", recipe=FeatureRecipe("mind", {}, "cpu"),
                   field_options=FieldOptions(optimise_iterations=0))
    [record] = run_batch(read_manifest(manifest), job, tmp_path / "out", client)
    assert record["status"] == "ok" and record["lesions"] == 1, record
    assert main(["track", str(series / "baseline.nii.gz"), str(series / "followup0.nii.gz"), "--lesions",
                 str(tmp_path / "lesions.nii.gz"), "--out", str(tmp_path / "single"), "--backbone", "mind",
                 "--device", "cpu", "--optimise-iterations", "0", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "out" / "t0").iterdir()) == sorted([*names, "row.json"])
    assert (tmp_path / "out" / "t0" / "lesions.csv").read_text() == (tmp_path / "single" / "lesions.csv").read_text()


def test_a_series_row_follows_its_lesions_on_features_shared_with_the_other_rows(client, tmp_path):
    """The 4-scan series of test_lesion_series as one row (moving: its follow-ups joined by ';') beside a
    pair row of the same baseline and first follow-up: one feature task per scan, the series files."""
    from distributed import get_task_stream
    from test_lesion_series import assert_series_outputs, write_series

    scans, _ = write_series(tmp_path)
    names = [Path(path).name for path in scans]
    manifest = tmp_path / "series.csv"
    manifest.write_text(f"id,fixed,moving,lesions\nseries,{names[0]},{';'.join(names[1:])},lesions.nii.gz\n"
                        f"pair,{names[0]},{names[1]},lesions.nii.gz\n")
    rows = read_manifest(manifest)
    assert rows[0].followups == tuple(scans[1:]) and rows[1].followups == (scans[1],)
    fast = FieldOptions(levels=(FieldLevel(spacing_mm=8.0, search_radius_mm=12.0),), optimise_iterations=0)
    job = BatchJob(task="track", recipe=FeatureRecipe("mind", {}, "cpu"), field_options=fast,
                   series_options=SeriesOptions(route="chained"))
    with get_task_stream(client) as tasks:
        records = run_batch(rows, job, tmp_path / "out", client)
    assert [record["status"] for record in records] == ["ok", "ok"], records
    assert sum(str(task["key"]).startswith("meddift-features") for task in tasks.data) == 4
    assert_series_outputs(tmp_path / "out" / "series", "chained")
    assert (tmp_path / "out" / "pair" / "followup_lesions.nii.gz").is_file()
    series = {line["id"]: line for line in read_summary(tmp_path / "out" / "summary.csv")}["series"]
    assert (series["lesions"], series["lesions_ok"], series["response"]) == ("3", "2", "PD")  # 2 is gone
    assert series["moving"] == ";".join(scans[1:]) and series["features_recomputed"] == "0"

    assert [record["status"] for record in run_batch(rows, job, tmp_path / "out", client)] == ["done", "done"]
    other = dataclasses.replace(job, series_options=SeriesOptions(route="chained", max_targets=1))
    assert [record["status"] for record in run_batch(rows, other, tmp_path / "out", client)] == ["ok", "done"]
    [refused] = run_batch(rows[:1], _job(), tmp_path / "match", client)
    assert refused["status"] == "failed" and refused["kind"] == "bad_input"
    assert "several moving volumes (a series) are for --task track only" in refused["error"]


def test_a_series_cell_with_an_empty_followup_is_refused(tmp_path):
    manifest = tmp_path / "gap.csv"
    manifest.write_text("fixed,moving\nb.nii.gz,m1.nii.gz;;m3.nii.gz\n")
    with pytest.raises(BadInputError, match="line 2: an empty follow-up in its moving cell"):
        read_manifest(manifest)


# ------------------------------------------------------------------ nothing silently wrong (issue 26)


def test_a_truncated_volume_fails_its_row_with_the_reason_and_the_others_go_on(series, client, tmp_path):
    """SimpleITK would read the cut file's missing part as zeros and the row would say ``ok``."""
    data = (series / "followup2.nii.gz").read_bytes()
    (series / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    text = (series / "manifest.csv").read_text().splitlines()
    text.append("cut,baseline.nii.gz,cut.nii.gz,points.csv,truth2.csv")
    manifest = series / "with_cut.csv"
    manifest.write_text("\n".join(text) + "\n")
    records = {record["id"]: record for record in run_batch(read_manifest(manifest), _job(), tmp_path, client)}
    assert records["cut"]["status"] == "failed" and records["cut"]["kind"] == "bad_input"
    assert "cut.nii.gz: the compressed file is damaged or truncated" in records["cut"]["error"]
    assert all(records[f"pair{n}"]["status"] == "ok" for n in range(4))
    assert not (tmp_path / "cut").exists()
    line = next(line for line in read_summary(tmp_path / "summary.csv") if line["id"] == "cut")
    assert line["status"] == "failed" and "truncated" in line["error"]


def test_a_row_over_the_workers_memory_is_refused_before_its_lattice_and_the_others_go_on(series, client,
                                                                                          tmp_path):
    """A 2 mm lattice searched 25 mm around on this grid needs over 2 GB of similarity tables; the workers have 2 GB."""
    from MedDIFTLib.core.options import FieldLevel

    fine = BatchJob(task="register", recipe=FeatureRecipe("mind", {}, "cpu"),
                    field_options=FieldOptions(levels=(FieldLevel(spacing_mm=2.0, search_radius_mm=25.0),),
                                               optimise_iterations=0))
    records = run_batch(read_manifest(series / "manifest.csv")[:2], fine, tmp_path, client)
    assert [record["status"] for record in records] == ["failed", "failed"]
    assert all(record["kind"] == "out_of_memory" for record in records)
    assert "this Dask worker's memory limit (--memory-limit): use a coarser lattice (--grid-spacing-mm, now 2 mm)" \
        in records[0]["error"]
    assert not any(path.name != "summary.csv" for path in tmp_path.iterdir())


def test_an_interrupted_batch_leaves_no_staging_folder(series, tmp_path):
    out = tmp_path / "out"
    process = _run_cli(series, out)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not any((out / ".staging").glob("*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=TIMEOUT_S)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output
    assert not (out / ".staging").exists(), list((out / ".staging").rglob("*"))


def test_a_hidden_row_id_is_told_what_ids_may_be(tmp_path):
    manifest = tmp_path / "hidden.csv"
    manifest.write_text("id,fixed,moving\n.staging,a.nii.gz,b.nii.gz\n")
    with pytest.raises(BadInputError, match=r"id '.staging' must start with a letter or a digit, then letters"):
        read_manifest(manifest)


def test_an_input_inside_a_rows_output_folder_is_refused_before_the_row_replaces_it(series, tmp_path):
    out = tmp_path / "out"
    (out / "pair0").mkdir(parents=True)
    (out / "pair0" / "baseline.nii.gz").write_bytes((series / "baseline.nii.gz").read_bytes())
    (tmp_path / "inside.csv").write_text(f"id,fixed,moving\npair0,{out / 'pair0' / 'baseline.nii.gz'},"
                                         f"{series / 'followup0.nii.gz'}\n")
    assert main(["batch", str(tmp_path / "inside.csv"), "--out", str(out), "--quiet", *MATCH]) == 2
    assert sorted(p.name for p in out.rglob("*")) == ["baseline.nii.gz", "pair0"]
