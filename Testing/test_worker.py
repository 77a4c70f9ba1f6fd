"""The background worker, driven as a real subprocess (``python -m MedDIFTLib.worker``) through
:class:`WorkerClient` and through raw JSON lines: probe, load, match on a real CT pair with a known
shift, cached re-match, every error kind, cancel, kill mid-job, malformed and oversized requests."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import CHEST_DIR, require
from scipy import ndimage

import MedDIFTLib
from MedDIFTLib.core.environment import PACKAGE_PARENT
from MedDIFTLib.core.geometry import FINEST_WORKING_MM, Geometry
from MedDIFTLib.core.io import Volume, read_volume, write_volume
from MedDIFTLib.features import FeatureLevel, FeaturePyramid
from MedDIFTLib.worker.cache import CacheKey, FeatureCache
from MedDIFTLib.worker.client import WorkerClient
from MedDIFTLib.worker.events import Error, Exit, Progress, Result
from MedDIFTLib.worker.stream import json_safe, read_bounded_line

# Two MIND pyramids of the 57x78x64 crop (15.5 MB each) fit, three do not.
CACHE_BYTES = 70_000_000  # two volumes' float32 MIND features (on the crop's isotropic grid), not three
SHIFT_KJI = (1, -1, 2)  # voxels: moving content = fixed content moved by this many voxels
TIMEOUT_S = 120


def _shifted(volume: Volume, shift_kji, name: str) -> Volume:
    """``volume`` with its content moved by whole voxels (exact, nearest-neighbour edges)."""
    return Volume(ndimage.shift(volume.voxels, shift_kji, order=0, mode="nearest"), volume.geometry, name)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """Real CT crop, a copy shifted by SHIFT_KJI voxels, a third variant, and the shift in LPS mm."""
    fixed_path = require(CHEST_DIR / "elastix_lung_baseline_small" / "image.nii.gz")
    fixed = read_volume(fixed_path)
    folder = tmp_path_factory.mktemp("worker_pair")
    write_volume(_shifted(fixed, SHIFT_KJI, "moving"), folder / "moving.nii.gz")
    write_volume(_shifted(fixed, (0, 2, -1), "third"), folder / "third.nii.gz")
    shift_ijk = np.asarray(SHIFT_KJI[::-1], float)
    shift_lps = fixed.geometry.ijk_to_lps(shift_ijk[None])[0] - fixed.geometry.ijk_to_lps(np.zeros((1, 3)))[0]
    ijk = np.array([[28, 39, 32], [20, 50, 40], [35, 30, 25], [25, 45, 20], [32, 35, 45], [22, 30, 30],
                    [38, 50, 35], [30, 25, 38], [26, 55, 28], [34, 42, 22]], float)
    return {
        "fixed": str(fixed_path),
        "moving": str(folder / "moving.nii.gz"),
        "third": str(folder / "third.nii.gz"),
        "geometry": fixed.geometry,
        "shift_lps": shift_lps,
        "points": fixed.geometry.ijk_to_lps(ijk),
    }


@pytest.fixture(scope="module")
def client():
    worker = WorkerClient(worker_args=["--cache-bytes", str(CACHE_BYTES)])
    worker.start(timeout=TIMEOUT_S)
    yield worker
    assert worker.stop() == 0, worker.stderr_tail()


@pytest.fixture(scope="module")
def loaded(client, pair) -> dict:
    return {
        "fixed_id": client.call("load", path=pair["fixed"], timeout=TIMEOUT_S)["volume_id"],
        "moving_id": client.call("load", path=pair["moving"], timeout=TIMEOUT_S)["volume_id"],
    }


def _match_request(loaded: dict, points, **extra) -> dict:
    request = {"backbone": "mind", "backbone_options": {}, "device": "cpu", "points_lps_mm": points}
    request.update(loaded)
    request.update(extra)
    return request


def test_client_imports_neither_torch_nor_qt():
    heavy = ("torch", "monai", "qt", "PythonQt", "PyQt5", "PySide2")
    code = f"import sys, MedDIFTLib.worker.client; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert output.stdout.strip() == "[]"


def test_probe_reports_versions_devices_backbones_and_cache(client, tmp_path):
    probe = client.call("probe", backbone_options={"maisi": {"weights_dir": str(tmp_path)}}, timeout=TIMEOUT_S)
    assert probe["version"] == MedDIFTLib.__version__ == client.version
    assert probe["torch"] == torch.__version__
    assert probe["pid"] == client.transport.pid
    cpu = probe["devices"][0]
    assert cpu["name"] == "cpu" and 0 < cpu["free_bytes"] <= cpu["memory_bytes"]
    assert [d["name"] for d in probe["devices"][1:]] == [f"cuda:{n}" for n in range(torch.cuda.device_count())]
    assert probe["default_device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    backbones = {b["name"]: b for b in probe["backbones"]}
    assert backbones["mind"]["weights_present"] is True
    assert backbones["maisi"]["available"] is True and backbones["maisi"]["weights_present"] is False
    assert probe["cache"]["max_bytes"] == CACHE_BYTES
    assert probe["limits"]["max_points"] == 100_000


def test_load_returns_geometry_and_same_content_keeps_its_id(client, pair):
    first = client.call("load", path=pair["fixed"], timeout=TIMEOUT_S)
    image = sitk.ReadImage(pair["fixed"])
    geometry = first["geometry"]
    assert first["name"] == "image.nii.gz"
    assert geometry["shape_ijk"] == [57, 78, 64] == list(image.GetSize())
    np.testing.assert_allclose(geometry["spacing_mm"], image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(geometry["origin_lps_mm"], image.GetOrigin(), rtol=1e-6)
    np.testing.assert_allclose(geometry["direction"], image.GetDirection())
    assert client.call("load", path=pair["fixed"])["volume_id"] == first["volume_id"]
    assert client.call("load", path=pair["moving"])["volume_id"] != first["volume_id"]


def test_match_finds_the_known_shift_then_rematches_from_the_cache(client, loaded, pair):
    points = pair["points"]
    labels = [f"F-{n}" for n in range(len(points))]
    stages = []
    request = _match_request(loaded, points, labels=labels, options={"search_radius_mm": 12})
    first = client.call("match", progress=lambda stage, fraction, message: stages.append(stage), **request)
    assert first["labels"] == labels
    assert not first["features_cached"]
    assert {"features", "match", "backward check"} <= set(stages)
    errors_mm = np.linalg.norm(np.asarray(first["points_lps_mm"]) - (points + pair["shift_lps"]), axis=1)
    assert np.median(errors_mm) < 1.0, errors_mm
    assert np.mean(first["reliable"]) >= 0.7
    assert all(0.0 <= c <= 1.0 for c in first["confidence"])

    second = client.call("match", **request)
    assert second["features_cached"]
    np.testing.assert_allclose(second["points_lps_mm"], first["points_lps_mm"])
    assert second["seconds"] < first["seconds"]

    # a match computes features only where it reads them; the idle worker fills in the rest
    deadline = time.monotonic() + TIMEOUT_S
    while (cache := client.call("probe")["cache"])["filled_bytes"] < cache["used_bytes"]:
        assert time.monotonic() < deadline, cache
        time.sleep(0.05)
    assert all(entry["filled_bytes"] == entry["bytes"] for entry in cache["entries"])
    features = client.call("features", volume_id=loaded["fixed_id"], backbone="mind", device="cpu")
    assert features["cached"] and features["seconds"] == 0.0
    assert [level["channels"] for level in features["levels"]] == [12, 12, 12]
    working_grid = read_volume(pair["fixed"]).geometry.working_grid(FINEST_WORKING_MM)  # of the 5 mm slices
    assert features["levels"][0]["shape_ijk"] == list(working_grid.shape_ijk)


def test_poll_hands_out_events_without_blocking(client):
    request_id = client.send("probe")
    deadline = time.monotonic() + TIMEOUT_S
    received = []
    while not any(isinstance(e, Result) and e.request_id == request_id for e in received):
        assert time.monotonic() < deadline, "no probe result"
        started = time.perf_counter()
        received += client.poll()
        assert time.perf_counter() - started < 0.05
        time.sleep(0.01)


def _too_many_points() -> list:
    return [[0.0, 0.0, 0.0]] * 100_001


ERROR_CASES = {
    "unknown request type": ("bad_request", "frobnicate", {}),
    "missing volume id": ("bad_request", "match", {"fixed_id": None}),
    "unknown volume id": ("bad_request", "match", {"moving_id": "v999"}),
    "unknown match option": ("bad_request", "match", {"options": {"search_radius": 5}}),
    "option of the wrong type": ("bad_request", "match", {"options": {"search_radius_mm": "far"}}),
    "points are not triples": ("bad_request", "match", {"points_lps_mm": [[0.0, 1.0]]}),
    "labels do not pair with points": ("bad_request", "match", {"labels": ["only one"]}),
    "too many points": ("bad_request", "match", {"points_lps_mm": _too_many_points()}),
    "unsupported backbone option": ("bad_input", "features", {"backbone_options": {"colour": "red"}}),
    "register without output": ("bad_request", "register", {"out_transform": None}),
    "missing file": ("bad_input", "load", {"path": "/nonexistent/volume.nii.gz"}),
    "not an image": ("bad_input", "load", {"path": __file__}),
    "points outside the fixed volume": ("bad_input", "match", {"points_lps_mm": [[1e4, 1e4, 1e4]]}),
    "negative search radius": ("bad_input", "match", {"options": {"search_radius_mm": -1.0}}),
    "unknown device": ("bad_input", "features", {"device": "tpu"}),
    "missing weights": ("missing_weights", "features", {"backbone": "maisi", "backbone_options": "WEIGHTS_DIR"}),
    "out of memory": ("out_of_memory", "features", {"backbone_options": {"dilation": 100_000}}),  # a PB-sized pad
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_kind_is_reported_and_the_worker_keeps_serving(client, loaded, pair, tmp_path, case):
    kind, request_type, changes = ERROR_CASES[case]
    params = _match_request(loaded, pair["points"][:2])
    params["volume_id"] = loaded["fixed_id"]
    params["out_transform"] = str(tmp_path / "field.nii.gz")
    params.update(changes)
    if params["backbone_options"] == "WEIGHTS_DIR":
        params["backbone_options"] = {"weights_dir": str(tmp_path)}
    with pytest.raises(MedDIFTLib.core.errors.MedDIFTError) as raised:
        client.call(request_type, timeout=TIMEOUT_S, **params)
    assert raised.value.kind == kind, str(raised.value)
    assert str(raised.value)
    assert client.call("probe", timeout=TIMEOUT_S)["pid"] == client.transport.pid
    assert not list(tmp_path.iterdir())


def test_malformed_and_oversized_requests_are_rejected_and_serving_goes_on(client):
    client.poll()
    for line in (b"{not json", b"[1, 2, 3]", b'{"type": "probe"}', b'{"id": "nan", "type": "probe", "x": NaN}'):
        client.send_line(line)
    huge = b'{"id": "huge", "type": "load", "path": "' + b"x" * (17 * 2**20) + b'"}'
    client.send_line(huge)
    huge_events = list(client.events("huge", timeout=TIMEOUT_S))
    assert [(type(e), e.kind) for e in huge_events] == [(Error, "bad_request")]
    assert "longer than" in huge_events[0].message
    assert client.call("probe", timeout=TIMEOUT_S)["pid"] == client.transport.pid
    rejected = [e for e in client.poll() if e.request_id is None and isinstance(e, Error)]
    assert [e.kind for e in rejected] == ["bad_request"] * 4


def _long_match(loaded: dict, pair: dict, count: int = 3000) -> dict:
    """A match that reports progress after every point (tiny memory budget) and runs for many seconds."""
    rng = np.random.default_rng(1)
    ijk = rng.uniform(5, np.asarray(pair["geometry"].shape_ijk) - 6, size=(count, 3))
    points = pair["geometry"].ijk_to_lps(ijk)
    return _match_request(loaded, points, options={"memory_budget_mb": 0.01, "search_radius_mm": 15})


def test_cancel_stops_the_running_job_and_can_drop_a_queued_one(client, loaded, pair):
    client.call("match", timeout=TIMEOUT_S, **_match_request(loaded, pair["points"][:1]))
    job = client.send("match", **_long_match(loaded, pair))
    queued = client.send("probe")
    queued_cancel = client.cancel(queued)
    assert list(client.events(queued_cancel, timeout=TIMEOUT_S))[-1].payload == {"cancelled": queued}
    assert [(type(e), e.kind) for e in client.events(queued, timeout=TIMEOUT_S)] == [(Error, "cancelled")]

    cancel_request = cancelled_at = None
    for event in client.events(job, timeout=TIMEOUT_S):
        if isinstance(event, Progress) and event.stage == "match" and cancel_request is None:
            cancel_request, cancelled_at = client.cancel(), time.monotonic()
    assert cancel_request is not None, "the job never reached the match stage"
    assert isinstance(event, Error) and event.kind == "cancelled"
    assert time.monotonic() - cancelled_at < 5.0
    assert list(client.events(cancel_request, timeout=TIMEOUT_S))[-1].payload == {"cancelled": job}
    assert client.call("cancel") == {"cancelled": None}
    assert client.call("probe", timeout=TIMEOUT_S)["pid"] == client.transport.pid


def test_feature_cache_is_bounded_and_evicts_the_least_recently_used(client, loaded, pair):
    third = client.call("load", path=pair["third"], timeout=TIMEOUT_S)["volume_id"]
    options = {"backbone": "mind", "backbone_options": {"hu_window": [-1000, 900], "dtype": "float32"}, "device": "cpu"}

    def features(volume_id: str) -> bool:
        return client.call("features", volume_id=volume_id, timeout=TIMEOUT_S, **options)["cached"]

    assert not features(loaded["fixed_id"]) and not features(loaded["moving_id"])
    assert features(loaded["fixed_id"])  # now the most recently used
    assert not features(third)  # evicts the moving volume's features
    cache = client.call("probe")["cache"]
    assert [entry["volume"] for entry in cache["entries"]] == ["image.nii.gz", "third.nii.gz"]
    assert all(entry["config"]["hu_window"] == [-1000, 900] for entry in cache["entries"])
    assert 0 < cache["used_bytes"] <= CACHE_BYTES
    assert features(loaded["fixed_id"]) and not features(loaded["moving_id"])


def _quick_field_options() -> dict:
    """Registration options for a seconds-long run: one 6 mm matching level, no optimisation, no mask
    (the lung crop is mostly below the body-mask threshold)."""
    from MedDIFTLib.field import FieldOptions

    defaults = FieldOptions()
    level = dataclasses.asdict(defaults.levels[0])
    level.update(spacing_mm=6.0, search_radius_mm=10.0, smoothness_mm=24.0)
    return {"levels": [level], "optimise_iterations": 0, "automatic_region": False}


def test_register_writes_the_field_and_warped_image(client, loaded, pair, tmp_path):
    out = tmp_path / "out"
    summary = client.call(
        "register",
        timeout=TIMEOUT_S,
        fixed_id=loaded["fixed_id"],
        moving_id=loaded["moving_id"],
        backbone="mind",
        device="cpu",
        out_transform=str(out / "field.nii.gz"),
        out_warped=str(out / "warped.nii.gz"),
        options=_quick_field_options(),
    )
    assert summary["transform"] == str(out / "field.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["field.nii.gz", "warped.nii.gz"]
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "field.nii.gz")))
    interior = field[16:48, 20:58, 14:43].reshape(-1, 3)
    np.testing.assert_allclose(np.median(interior, axis=0), pair["shift_lps"], atol=1.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_kill_mid_job_leaves_no_process_and_no_output_then_restart_and_stop(pair, tmp_path):
    worker = WorkerClient()
    worker.start(timeout=TIMEOUT_S)
    try:
        ids = {
            "fixed_id": worker.call("load", path=pair["fixed"], timeout=TIMEOUT_S)["volume_id"],
            "moving_id": worker.call("load", path=pair["moving"], timeout=TIMEOUT_S)["volume_id"],
        }
        out = tmp_path / "out"
        job = worker.send(
            "register", backbone="mind", device="cpu", out_transform=str(out / "field.nii.gz"),
            out_inverse=str(out / "inverse.nii.gz"), out_warped=str(out / "warped.nii.gz"), **ids
        )
        events = worker.events(job, timeout=TIMEOUT_S)
        for event in events:
            if isinstance(event, Progress) and event.stage not in ("features", "load"):
                break
        pgid = worker.transport.pid
        assert _group_alive(pgid)
        worker.kill()
        assert not worker.running and not _group_alive(pgid)
        final = list(events)[-1]
        assert isinstance(final, Error) and final.kind == "cancelled"
        assert not out.exists() or not list(out.iterdir())
        assert any(isinstance(e, Exit) for e in worker.poll())

        worker.start(timeout=TIMEOUT_S)  # the same client starts a fresh worker
        volume_id = worker.call("load", path=pair["third"], timeout=TIMEOUT_S)["volume_id"]
        job = worker.send("features", volume_id=volume_id, backbone="mind", device="cpu")
        events = worker.events(job, timeout=TIMEOUT_S)
        assert isinstance(next(events), Progress)
        assert worker.stop(timeout=TIMEOUT_S) == 0
        final = list(events)[-1]
        assert isinstance(final, Error) and final.kind == "cancelled"
    finally:
        worker.kill()


def test_internal_error_stdout_purity_and_shutdown_on_end_of_input():
    """A handler that crashes gives an ``internal`` error; prints from library code never reach
    stdout; the worker keeps serving; EOF on stdin ends it with code 0."""
    code = "\n".join(
        [
            "import os, MedDIFTLib.worker.handlers as h, MedDIFTLib.worker.server as w",
            "def crash(state, request, progress):",
            "    return {}['no such key']",
            "def noisy(state, request, progress):",
            "    print('noise from print')",
            "    os.write(1, b'noise on fd 1\\n')",
            "    return {'unloaded': False}",
            "h.HANDLERS['probe'] = crash",
            "h.HANDLERS['unload'] = noisy",
            "w.exit_now(w.main())",
        ]
    )
    requests = [
        {"id": "p", "type": "probe"},
        {"id": "u", "type": "unload", "volume_id": "v1"},
        {"id": "l", "type": "load", "path": "/nonexistent.nii.gz"},
    ]
    stdin = "".join(json.dumps(r) + "\n" for r in requests).encode()
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    done = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, env=env, timeout=TIMEOUT_S, check=False
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, done.stderr.decode()
    assert events[0]["event"] == "ready"
    final = {e["id"]: e for e in events if e["event"] in ("result", "error")}
    assert final["p"]["kind"] == "internal" and "KeyError" in final["p"]["message"]
    assert final["u"]["result"] == {"unloaded": False}
    assert final["l"]["kind"] == "bad_input"
    stderr = done.stderr.decode()
    assert "Traceback" in stderr and "noise from print" in stderr and "noise on fd 1" in stderr


def test_terminated_worker_exits_at_once():
    worker = WorkerClient()
    worker.start(timeout=TIMEOUT_S)
    os.kill(worker.transport.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while worker.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.transport.returncode == 128 + signal.SIGTERM
    worker.kill()


# ---------------------------------------------------------------- in-process parts


def _pyramid(megabytes: int) -> FeaturePyramid:
    geometry = Geometry.create((megabytes * 2**18, 1, 1), (1.0, 1.0, 1.0))
    level = FeatureLevel("l", torch.zeros(1, *geometry.shape_kji), geometry)
    return FeaturePyramid([level], geometry, "test")


def test_cache_evicts_least_recently_used_by_bytes():
    cache = FeatureCache(max_bytes=3 * 2**20)
    keys = [CacheKey.create(f"hash{n}", "test", {"n": n}, "cpu") for n in range(3)]
    assert cache.put(keys[0], _pyramid(1), "a") and cache.put(keys[1], _pyramid(1), "b")
    assert cache.get(keys[0]) is not None
    assert cache.put(keys[2], _pyramid(2), "c")
    assert keys[1] not in cache and keys[0] in cache and keys[2] in cache
    assert cache.used_bytes == 3 * 2**20
    assert not cache.put(CacheKey.create("big", "test", {}, "cpu"), _pyramid(4))
    assert [e["volume"] for e in cache.describe()["entries"]] == ["a", "c"]


def test_cache_key_follows_content_and_configuration_not_names():
    assert CacheKey.create("h", "mind", {"b": 1, "a": [1, 2]}, "cpu") == CacheKey.create(
        "h", "mind", {"a": [1, 2], "b": 1}, "cpu"
    )
    assert CacheKey.create("h", "mind", {"a": 1}, "cpu") != CacheKey.create("h", "mind", {"a": 2}, "cpu")


def test_events_turn_nan_into_null_and_numpy_into_lists():
    event = json_safe({"x": np.array([1.0, np.nan]), "y": np.float32(np.inf), "z": (1, np.int64(2))})
    assert json.dumps(event, allow_nan=False) == '{"x": [1.0, null], "y": null, "z": [1, 2]}'


def test_oversized_lines_are_skipped_whole():
    stream = io.BytesIO(b"short\n" + b"y" * 100 + b"\nnext\n")
    assert read_bounded_line(stream, 10) == (b"short\n", False)
    assert read_bounded_line(stream, 10)[1] is True
    assert read_bounded_line(stream, 10) == (b"next\n", False)
    assert read_bounded_line(stream, 10) == (None, False)
