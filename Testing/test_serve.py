"""``meddift serve`` driven for real on 127.0.0.1 (uvicorn in a thread, or a subprocess when it
must be killed): match, register, overlays, track and track_series round trips equal to the local
worker's (the Slicer panel's session on the server too), a failed or cancelled track leaving its folder as it was,
the token, the bind check, upload and request limits, path-style loads refused, session isolation
and clean-up, cancel on disconnect, and a server killed mid-job."""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import uvicorn
from conftest import CHEST_DIR, require
from scipy import ndimage
from test_lesion_series import assert_series_outputs, write_series
from test_lesions import GEOMETRY, ball, labelmap_volume, write_tracking_pair

import MedDIFTLib
from MedDIFTLib.core.environment import PACKAGE_PARENT
from MedDIFTLib.core.errors import BadInputError, BadRequestError, CancelledError, MedDIFTError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume, read_volume, write_volume
from MedDIFTLib.core.options import (
    FieldLevel,
    FieldOptions,
    LesionOptions,
    RunSettings,
    SeriesOptions,
    ServeOptions,
    parse_options,
)
from MedDIFTLib.lesions.outputs import FILES
from MedDIFTLib.lesions.series_outputs import labelmap_name, series_output_paths
from MedDIFTLib.slicer.session import describe_server
from MedDIFTLib.worker.client import WorkerClient
from MedDIFTLib.worker.events import Error, Progress, Result, WorkerError
from MedDIFTLib.worker.http_session import read_token_file
from MedDIFTLib.worker.protocol.requests import (
    CancelRequest,
    FeaturesRequest,
    Limits,
    OverlaysRequest,
    ProbeRequest,
    TrackRequest,
    TrackSeriesRequest,
    encode_request,
)
from MedDIFTLib.worker.protocol.results import encode_result
from MedDIFTLib.worker.remote.app import ServeConfig, create_app, server_options
from MedDIFTLib.worker.remote.security import RateLimiter, check_bind, token_matches
from MedDIFTLib.worker.remote.sessions import INTERNAL_MESSAGE, SessionEvents
from MedDIFTLib.worker.remote.wire import GEOMETRY_HEADER, decode_volume, encode_volume
from MedDIFTLib.worker.remote_client import RemoteWorkerClient

TOKEN = "test-token-0123456789abcdef"
TIMEOUT_S = 120
QUICK_FIELD = {"levels": [{"spacing_mm": 6.0, "search_radius_mm": 10.0, "smoothness_mm": 24.0}],
               "optimise_iterations": 0, "automatic_region": False}


class ThreadServer:
    """The real app on uvicorn, on an ephemeral port of 127.0.0.1, in a thread."""

    def __init__(self, config: ServeConfig, **uvicorn_options) -> None:
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    **uvicorn_options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def raw(self, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
            headers: dict | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            connection.request(method, "/v1" + path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def _config(tmp_path: Path, device: str = "auto", weights_dir: Path | None = None,
            devices: tuple[str, ...] | None = None, **limits) -> ServeConfig:
    """A test server's configuration; ``limits`` are ServeOptions fields (MiB, seconds)."""
    options = ServeOptions(**{"max_upload_mb": 4.0, "max_sessions": 4, "cache_mb": 64.0, **limits})
    config = ServeConfig(cache_dir=tmp_path, options=options, token=TOKEN, device=device, weights_dir=weights_dir,
                         limits=Limits(max_request_bytes=256 * 2**10, max_points=1000))
    return config if devices is None else dataclasses.replace(config, devices=devices)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ThreadServer(_config(tmp_path_factory.mktemp("serve_cache")))
    yield running
    running.stop()
    assert not list(running.app.state.sessions.root.iterdir()), "sessions' folders left behind"


@pytest.fixture
def remote(server):
    client = RemoteWorkerClient(server.url, token=TOKEN, timeout_s=TIMEOUT_S)
    client.start()
    yield client
    client.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """A real CT crop and a copy shifted by whole voxels, with points inside."""
    fixed_path = require(CHEST_DIR / "elastix_lung_baseline_small" / "image.nii.gz")
    fixed = read_volume(fixed_path)
    folder = tmp_path_factory.mktemp("serve_pair")
    moving = Volume(ndimage.shift(fixed.voxels, (1, -1, 2), order=0, mode="nearest"), fixed.geometry, "moving")
    write_volume(moving, folder / "moving.nii.gz")
    ijk = np.array([[28, 39, 32], [20, 50, 40], [35, 30, 25], [25, 45, 20], [32, 35, 45]], float)
    return {"fixed": str(fixed_path), "moving": str(folder / "moving.nii.gz"), "points": fixed.geometry.ijk_to_lps(ijk)}


@pytest.fixture(scope="module")
def local(pair):
    worker = WorkerClient()
    worker.start(timeout=TIMEOUT_S)
    ids = {"fixed_id": worker.call("load", path=pair["fixed"])["volume_id"],
           "moving_id": worker.call("load", path=pair["moving"])["volume_id"]}
    yield worker, ids
    worker.stop()


def _small_volume(seed: int, shape_kji=(12, 14, 16)) -> Volume:
    voxels = np.random.default_rng(seed).normal(0, 300, shape_kji).astype(np.float32)
    return Volume(voxels, Geometry.create(shape_kji[::-1], (1.5, 1.0, 2.0), (-10.0, 5.0, 3.0)), f"small{seed}")


def _server_files(server: ThreadServer, client: RemoteWorkerClient) -> list[str]:
    """What the server keeps on its disk for ``client``'s session (its outputs until downloaded)."""
    folder = server.app.state.sessions.get(client.session_id).folder
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _stream_events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]


# ------------------------------------------------------------------ security, unit level


def test_a_non_loopback_bind_needs_a_token():
    with pytest.raises(BadInputError, match="without a token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(BadInputError, match="without a token"):
        check_bind("192.168.1.20", None)
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", TOKEN)


def test_serve_refuses_a_public_bind_without_token_before_binding(capsys):
    from MedDIFTLib.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_tokens_compare_whole_and_short_token_files_are_refused(tmp_path):
    assert token_matches(TOKEN, f"Bearer {TOKEN}")
    assert not token_matches(TOKEN, f"Bearer {TOKEN[:-1]}")
    assert not token_matches(TOKEN, None)
    assert not token_matches(TOKEN, f"Basic {TOKEN}")
    assert token_matches(None, None)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(BadInputError, match="at least 16"):
        read_token_file(tmp_path / "short")
    (tmp_path / "good").write_text(TOKEN + "\n")
    assert read_token_file(tmp_path / "good") == TOKEN


def test_rate_limiter_refuses_past_its_rate():
    limiter = RateLimiter(per_minute=3)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")


def test_events_carry_no_server_path_and_no_internal_detail(tmp_path):
    events = SessionEvents()
    scrubbed = events.scrub({"id": "r1", "event": "error", "kind": "missing_weights",
                             "message": f"{tmp_path}/session-1/ckpt.pt: not found; also C:\\weights\\a.pt"})
    assert scrubbed["message"] == "<server path>: not found; also <server path>"
    kept = "search radius 8 mm/s, 1/2 of the grid / both ways"
    assert events.scrub({"id": "r1", "event": "log", "message": kept})["message"] == kept
    internal = events.scrub({"id": "r1", "event": "error", "kind": "internal", "message": "Traceback /usr/lib"})
    assert internal["message"] == INTERNAL_MESSAGE


def test_server_options_give_a_typed_request_the_servers_device_and_weights_folder(tmp_path):
    config = _config(tmp_path, device="cpu", weights_dir=tmp_path / "weights")
    asked = FeaturesRequest("v1", RunSettings(backbone="maisi", backbone_options={"timestep": 5}, device="cuda"))
    served = RunSettings(backbone="maisi", backbone_options={"timestep": 5, "weights_dir": str(tmp_path / "weights")},
                         device="cpu")
    assert server_options(asked, config) == FeaturesRequest("v1", served)
    assert server_options(ProbeRequest({"maisi": {}}), config) == ProbeRequest({"maisi": {}})
    assert server_options(CancelRequest("r1"), config) == CancelRequest("r1")
    with pytest.raises(BadRequestError, match="chosen by the server"):
        server_options(ProbeRequest({"maisi": {"maisi.weights_dir": "/etc"}}), config)
    with pytest.raises(BadRequestError, match="is not a device of this server"):
        server_options(FeaturesRequest("v1", RunSettings(device="tpu")), _config(tmp_path, devices=("cpu",)))


def test_volume_wire_round_trip_and_refusals():
    volume = _small_volume(1)
    body, headers = encode_volume(volume)
    decoded = decode_volume(body, headers[GEOMETRY_HEADER], "small1", 2**20)
    assert decoded.content_hash() == volume.content_hash() and decoded.geometry == volume.geometry
    with pytest.raises(BadRequestError, match="exceeds"):
        decode_volume(body, headers[GEOMETRY_HEADER], "", 100)
    with pytest.raises(BadRequestError, match="do not fill"):
        decode_volume(zlib.compress(b"\0" * 16), headers[GEOMETRY_HEADER], "", 2**20)
    with pytest.raises(BadRequestError, match="must hold shape_ijk"):
        decode_volume(body, '{"shape_ijk": [16, 14, 12]}', "", 2**20)


# ------------------------------------------------------------------ the real server


def test_missing_or_wrong_token_is_401_and_nothing_runs(server):
    sessions = len(server.app.state.sessions)
    for token in (None, "wrong-token-0123456789"):
        assert server.raw("GET", "/info", token=token)[0] == 401
        assert server.raw("POST", "/sessions", token=token)[0] == 401
    assert len(server.app.state.sessions) == sessions
    with pytest.raises(BadRequestError, match="401"):
        RemoteWorkerClient(server.url, token="wrong-token-0123456789").start()
    assert len(server.app.state.sessions) == sessions


def test_test_connection_reports_version_device_and_limits(server):
    info = RemoteWorkerClient(server.url, token=TOKEN).test_connection()
    assert info["version"] == MedDIFTLib.__version__
    assert info["device"] == "auto"
    assert info["limits"]["max_upload_bytes"] == 4 * 2**20


def test_the_panels_test_connection_line_names_version_and_device_or_the_refusal(server):
    line = describe_server(server.url, TOKEN)
    assert line.startswith(f"meddift {MedDIFTLib.__version__} on ") and len(line) > len("meddift  on ")
    with pytest.raises(MedDIFTError, match="401"):
        describe_server(server.url, "wrong-token")


def test_path_load_shutdown_malformed_and_oversized_requests_are_refused_and_the_server_serves_on(server, remote):
    base = f"/sessions/{remote.session_id}/requests"
    status, body = server.raw("POST", base, json.dumps({"id": "a", "type": "load", "path": "/etc/passwd"}).encode())
    refused = json.loads(body)
    assert status == 400 and refused["id"] == "a" and "upload" in refused["message"]
    assert "/etc" not in refused["message"]
    status, body = server.raw("POST", base, b'{"id": "b", "type": "shutdown"}')
    assert status == 400 and json.loads(body)["kind"] == "bad_request"
    status, body = server.raw("POST", base, b"{not json")
    assert status == 400 and "malformed JSON" in json.loads(body)["message"]
    status, body = server.raw("POST", base, b'{"id": "c", "type": "match", "points_lps_mm": ' + b"1" * 300_000)
    assert status == 413 and json.loads(body)["kind"] == "bad_request"
    too_many = {"id": "d", "type": "match", "fixed_id": "v1", "moving_id": "v2", "points_lps_mm": [[0, 0, 0]] * 1001}
    status, body = server.raw("POST", base, json.dumps(too_many).encode())
    refused = json.loads(body)  # read as its typed request before any stream starts
    assert status == 400 and refused["id"] == "d" and refused["kind"] == "bad_request"
    assert "limit of 1000" in refused["message"]
    for options, message in (({"weights_dir": "/etc"}, "chosen by the server"),
                             ({"config": "/etc/passwd"}, "configuration dict or one of")):
        line = {"id": "e", "type": "features", "volume_id": "v1", "backbone": "maisi", "backbone_options": options}
        status, body = server.raw("POST", base, json.dumps(line).encode())
        assert status == 400 and message in json.loads(body)["message"]
    probe = remote.call("probe", backbone_options={"maisi": {}}, timeout=TIMEOUT_S)
    assert probe["version"] == MedDIFTLib.__version__ and "pid" not in probe
    maisi = next(backbone for backbone in probe["backbones"] if backbone["name"] == "maisi")
    assert "not found in <server path>" in maisi["message"] and str(Path.home()) not in maisi["message"]


def test_upload_over_the_limit_is_refused(server, remote):
    big = _small_volume(2, (64, 64, 64))
    body, headers = encode_volume(big)
    status, answer = server.raw("PUT", f"/sessions/{remote.session_id}/volumes/{big.content_hash()}",
                                body=body + b"\0" * (4 * 2**20), headers=headers)
    assert status == 413 and "limit" in json.loads(answer)["message"]
    status, answer = server.raw("PUT", f"/sessions/{remote.session_id}/volumes/{'0' * 40}", body=body,
                                headers=headers)
    assert status == 400 and "content hash" in json.loads(answer)["message"]
    assert json.loads(server.raw("GET", f"/sessions/{remote.session_id}")[1])["volumes"] == 0


def test_a_volume_is_uploaded_once_and_sessions_cannot_see_each_others(server, remote, tmp_path, monkeypatch):
    volume = _small_volume(3)
    write_volume(volume, tmp_path / "small.nrrd")
    uploads = []
    original = http.client.HTTPConnection.request

    def counting(connection, method, url, *args, **options):
        if method == "PUT":
            uploads.append(url)
        return original(connection, method, url, *args, **options)

    monkeypatch.setattr(http.client.HTTPConnection, "request", counting)
    first = remote.call("load", path=str(tmp_path / "small.nrrd"), timeout=TIMEOUT_S)
    again = remote.call("load", path=str(tmp_path / "small.nrrd"), timeout=TIMEOUT_S)
    assert first == again and len(uploads) == 1
    assert first["geometry"]["shape_ijk"] == [16, 14, 12]

    other = RemoteWorkerClient(server.url, token=TOKEN)
    other.start()
    try:
        assert server.raw("GET", f"/sessions/{other.session_id}/volumes/{volume.content_hash()}")[0] == 404
        with pytest.raises(BadRequestError, match="unknown volume id"):
            other.call("features", volume_id=first["volume_id"], backbone="mind", device="cpu", timeout=TIMEOUT_S)
    finally:
        other.stop()
    assert server.raw("GET", f"/sessions/{other.session_id}")[0] == 404


def test_rate_limit_and_idle_sessions_are_closed_with_their_folders(tmp_path):
    running = ThreadServer(_config(tmp_path, requests_per_minute=4, idle_timeout_s=0.01))
    try:
        client = RemoteWorkerClient(running.url, token=TOKEN)
        client.start()
        store = running.app.state.sessions
        folders = list(store.root.iterdir())
        assert len(folders) == 1
        deadline = time.monotonic() + 10
        while (len(store) or list(store.root.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.02)  # the reaper forgets the session, then stops its worker and deletes its folder
        assert len(store) == 0 and not list(store.root.iterdir()), "the idle session was not closed"
        with pytest.raises(BadRequestError, match="HTTP 404.*expired session"):
            client.call("probe", timeout=TIMEOUT_S)
        statuses = [running.raw("GET", "/info")[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
    finally:
        running.stop()


def test_match_round_trip_equals_the_local_worker(remote, local, pair):
    worker, local_ids = local
    request = {"backbone": "mind", "device": "cpu", "points_lps_mm": pair["points"],
               "labels": [f"F-{n}" for n in range(len(pair["points"]))], "options": {"search_radius_mm": 8}}
    expected = worker.call("match", timeout=TIMEOUT_S, **local_ids, **request)
    ids = {"fixed_id": remote.call("load", path=pair["fixed"])["volume_id"],
           "moving_id": remote.call("load", path=pair["moving"])["volume_id"]}
    stages = []
    got = remote.call("match", timeout=TIMEOUT_S, progress=lambda s, f, m: stages.append(s), **ids, **request)
    assert {"features", "match"} <= set(stages)
    assert got["labels"] == expected["labels"]
    # the server's torch threads differ from the worker's, and the FFT scoring rounds differently per thread count
    for key in ("points_lps_mm", "similarity", "confidence", "forward_backward_mm"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-4, err_msg=key)
    assert got["reliable"] == expected["reliable"]
    assert remote.call("match", timeout=TIMEOUT_S, **ids, **request)["features_cached"] is True


def test_register_round_trip_equals_the_local_worker_and_outputs_land_locally(server, remote, local, pair,
                                                                              tmp_path):
    worker, local_ids = local
    options = {"backbone": "mind", "device": "cpu", "options": QUICK_FIELD}
    worker.call("register", timeout=TIMEOUT_S, out_transform=str(tmp_path / "local.nii.gz"), **local_ids, **options)
    ids = {"fixed_id": remote.call("load", path=pair["fixed"])["volume_id"],
           "moving_id": remote.call("load", path=pair["moving"])["volume_id"]}
    out = tmp_path / "remote"
    summary = remote.call("register", timeout=TIMEOUT_S, out_transform=str(out / "field.nii.gz"),
                          out_warped=str(out / "warped.nrrd"), **ids, **options)
    assert summary["transform"] == str(out / "field.nii.gz") and summary["warped"] == str(out / "warped.nrrd")
    assert summary["inverse"] is None
    assert sorted(p.name for p in out.iterdir()) == ["field.nii.gz", "warped.nrrd"]
    assert _server_files(server, remote) == [], "the downloaded outputs are deleted on the server"
    local_field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local.nii.gz")))
    remote_field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "field.nii.gz")))
    # the same computation in two processes whose float32 sums may run in another order: equal to 1 um
    np.testing.assert_allclose(remote_field, local_field, atol=1e-3)
    assert sitk.ReadImage(str(out / "warped.nrrd")).GetSize() == (57, 78, 64)


def _call_overlays(client, fixed_id: str, moving_id: str, transform: str | None, out: Path) -> dict:
    """An overlays request built as every client builds it (protocol dataclass, encode_request), its result."""
    with_field = transform is not None
    request = OverlaysRequest(fixed_id=fixed_id, moving_id=moving_id, transform=transform,
                              out_confidence=str(out / "confidence.nii.gz"),
                              out_jacobian=str(out / "jacobian.nrrd") if with_field else None,
                              out_magnitude=str(out / "magnitude.mha") if with_field else None,
                              lattice=parse_options(FieldLevel, {"spacing_mm": 10.0, "search_radius_mm": 6.0}),
                              settings=RunSettings(backbone="mind", device="cpu"))
    request_type, fields = encode_request(request)
    return client.call(request_type, timeout=TIMEOUT_S, **fields)


def test_overlays_round_trip_uploads_the_field_and_equals_the_local_worker(server, remote, local, pair, tmp_path):
    worker, local_ids = local
    field = tmp_path / "field.h5"
    worker.call("register", timeout=TIMEOUT_S, out_transform=str(field), backbone="mind", device="cpu",
                options=QUICK_FIELD, **local_ids)
    expected = _call_overlays(worker, local_ids["fixed_id"], local_ids["moving_id"], str(field), tmp_path / "local")
    ids = {"fixed_id": remote.call("load", path=pair["fixed"])["volume_id"],
           "moving_id": remote.call("load", path=pair["moving"])["volume_id"]}
    out = tmp_path / "remote"
    got = _call_overlays(remote, ids["fixed_id"], ids["moving_id"], str(field), out)
    assert sorted(p.name for p in out.iterdir()) == ["confidence.nii.gz", "jacobian.nrrd", "magnitude.mha"]
    assert _server_files(server, remote) == [], "the field is held in memory, the outputs deleted once downloaded"
    assert sorted(got) == sorted(expected) == ["confidence", "jacobian", "magnitude"]
    for name, summary in got.items():
        assert summary["path"] == str(out / Path(expected[name]["path"]).name)
        local_voxels = read_volume(expected[name]["path"]).voxels
        remote_voxels = read_volume(summary["path"]).voxels
        assert remote_voxels.shape == local_voxels.shape == read_volume(pair["fixed"]).voxels.shape
        # the same computation in two processes whose float32 sums may run in another order
        np.testing.assert_allclose(remote_voxels, local_voxels, atol=1e-3, err_msg=name)
        for key in ("min", "max", "mean"):
            assert summary[key] == pytest.approx(expected[name][key], abs=1e-3)
    assert np.ptp(read_volume(out / "magnitude.mha").voxels) > 0
    confidence_only = _call_overlays(remote, ids["fixed_id"], ids["moving_id"], None, tmp_path / "plain")
    assert list(confidence_only) == ["confidence"] and (tmp_path / "plain" / "confidence.nii.gz").is_file()


def test_overlays_on_a_server_take_only_an_uploaded_field(server, remote, tmp_path):
    line = {"id": "o", "type": "overlays", "fixed_id": "v1", "moving_id": "v2", "transform": "/etc/passwd",
            "out_confidence": "confidence.nii.gz"}
    status, body = server.raw("POST", f"/sessions/{remote.session_id}/requests", json.dumps(line).encode())
    refused = json.loads(body)
    assert status == 400 and refused["id"] == "o" and "a field uploaded to this session" in refused["message"]
    not_a_field = tmp_path / "image.nii.gz"
    write_volume(_small_volume(15), not_a_field)
    with pytest.raises(BadInputError, match="3 components per voxel"):
        _call_overlays(remote, "v1", "v2", str(not_a_field), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ lesion tracking on a server

TRACK_FIELD = {"levels": [{"spacing_mm": 8.0, "search_radius_mm": 12.0}], "optimise_iterations": 0}


@pytest.fixture(scope="module")
def track_files(tmp_path_factory) -> dict:
    """The tracking pair of test_lesions.write_tracking_pair (two nodules, moved by TRACK_SHIFT_LPS)."""
    return write_tracking_pair(tmp_path_factory.mktemp("serve_track"))


def _call_track(client, track_files: dict, lesions: str, out_dir: Path, field: dict = TRACK_FIELD) -> dict:
    """A track request built as every client builds it (protocol dataclass, encode_request), its result."""
    ids = {name: client.call("load", path=track_files[source], timeout=TIMEOUT_S)["volume_id"]
           for name, source in (("baseline_id", "baseline"), ("followup_id", "followup"))}
    request = TrackRequest(**ids, lesions=lesions, out_dir=str(out_dir), lesion_options=LesionOptions(),
                           settings=RunSettings(backbone="mind", device="cpu",
                                                field=parse_options(FieldOptions, field)))
    request_type, fields = encode_request(request)
    return client.call(request_type, timeout=TIMEOUT_S, **fields)


def test_track_round_trip_equals_the_local_worker_and_its_files_land_in_out_dir(server, remote, local, track_files,
                                                                                 tmp_path):
    worker, _ = local
    expected = _call_track(worker, track_files, track_files["lesions"], tmp_path / "local")
    out = tmp_path / "remote"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    got = _call_track(remote, track_files, track_files["lesions"], out)
    assert got["files"] == {key: str(out / name) for key, name in FILES.items()}
    assert _server_files(server, remote) == [], "the labelmap is held in memory, the outputs deleted once downloaded"
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"
    for lesion, want in zip(got["lesions"], expected["lesions"], strict=True):
        assert (lesion["label"], lesion["name"], lesion["status"]) == (want["label"], want["name"], want["status"])
        np.testing.assert_allclose(lesion["centre_lps_mm"], want["centre_lps_mm"], atol=1e-3)
    np.testing.assert_array_equal(read_volume(out / FILES["labelmap"]).voxels,
                                  read_volume(tmp_path / "local" / FILES["labelmap"]).voxels)
    local_rows = (tmp_path / "local" / FILES["csv"]).read_text().splitlines()
    assert (out / FILES["csv"]).read_text().splitlines() == local_rows and len(local_rows) == 3
    assert (out / FILES["sheet"]).read_bytes().startswith(b"\x89PNG")
    assert "<server path>" not in (out / FILES["report"]).read_text()


def test_a_remote_track_that_fails_or_is_cancelled_leaves_out_dir_as_it_was(server, remote, track_files,
                                                                            tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / FILES["csv"]).write_text("the user's own table")
    bad = labelmap_volume([(ball(GEOMETRY, (0, 0, 0), 3.0), 0.5)], GEOMETRY)
    write_volume(bad, tmp_path / "bad.nii.gz")
    with pytest.raises(BadInputError, match="label values must be integers") as refused:
        _call_track(remote, track_files, str(tmp_path / "bad.nii.gz"), out)
    assert str(tmp_path) not in str(refused.value)
    assert sorted(p.name for p in out.iterdir()) == [FILES["csv"]]
    assert _server_files(server, remote) == []

    slow = {"levels": [{"spacing_mm": 3.0, "search_radius_mm": 12.0}], "optimise_iterations": 200}
    ids = {name: remote.call("load", path=track_files[source], timeout=TIMEOUT_S)["volume_id"]
           for name, source in (("baseline_id", "baseline"), ("followup_id", "followup"))}
    request = TrackRequest(**ids, lesions=track_files["lesions"], out_dir=str(out), lesion_options=LesionOptions(),
                           settings=RunSettings(backbone="mind", device="cpu", field=parse_options(FieldOptions, slow)))
    request_type, fields = encode_request(request)
    job = remote.send(request_type, **fields)
    events = remote.events(job, timeout=TIMEOUT_S)
    assert isinstance(next(events), Progress)  # the server runs it: cancel it there
    remote.cancel(job)
    final = list(events)[-1]
    assert isinstance(final, Error) and final.kind == CancelledError.kind
    assert sorted(p.name for p in out.iterdir()) == [FILES["csv"]]
    assert (out / FILES["csv"]).read_text() == "the user's own table"
    assert _server_files(server, remote) == [], "a cancelled job's outputs are deleted on the server"


def test_remote_track_lesions_must_be_an_uploaded_labelmap(server, remote, track_files, tmp_path):
    points = tmp_path / "points.csv"
    points.write_text("label,l,p,s\nA,-7.0,1.0,0.0\n")
    with pytest.raises(BadRequestError, match="point files and .seg.nrrd segment names are read by a local worker"):
        _call_track(remote, track_files, str(points), tmp_path / "out")
    line = {"id": "t", "type": "track", "baseline_id": "v1", "followup_id": "v2", "lesions": "/etc/passwd",
            "out_dir": "track"}
    status, body = server.raw("POST", f"/sessions/{remote.session_id}/requests", json.dumps(line).encode())
    refused = json.loads(body)
    assert status == 400 and "volume id of a labelmap uploaded to this session" in refused["message"]
    assert not (tmp_path / "out").exists()


def _rounded(value, digits: int = 3):
    """``value`` (a decoded JSON document) with every float rounded to ``digits`` decimals, as the
    series CSV files write them. The typed results of the local and the remote worker differed once in
    the last float bits while the files were byte-identical: the dense field's fit is not bit-identical
    across torch thread counts (1 and 2 threads differ by about 1e-6 mm, 2 and 3 agree; the features
    do not differ), and the worker subprocess and this test process need not run with the same
    count, so they are compared at the precision of the files."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def test_a_series_round_trip_equals_the_local_worker_and_its_files_land_in_out_dir(server, remote, local,
                                                                                  tmp_path_factory, tmp_path):
    """The 4-scan series of test_lesion_series: each scan uploaded once, the series files downloaded."""
    scans, lesions = write_series(tmp_path_factory.mktemp("serve_series"))
    settings = RunSettings(backbone="mind", device="cpu", field=parse_options(FieldOptions, TRACK_FIELD))

    def run(client, out: Path):
        ids = [client.call("load", path=path, timeout=TIMEOUT_S)["volume_id"] for path in scans]
        request = TrackSeriesRequest(ids[0], tuple(ids[1:]), lesions, str(out), LesionOptions(),
                                     SeriesOptions(route="chained"), settings)
        return client.run(request, timeout=TIMEOUT_S)

    worker, _ = local
    expected = run(worker, tmp_path / "local")
    out = tmp_path / "remote"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    got = run(remote, out)
    paths = series_output_paths(out, 3)
    assert got.files == {key: str(path) for key, path in paths.items()}
    assert _server_files(server, remote) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([*(path.name for path in paths.values()), "notes.txt"])
    assert_series_outputs(out, "chained")
    for name in ("lesions.csv", "response.csv", *(labelmap_name(k) for k in (1, 2, 3))):
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert "<server path>" not in (out / "report.md").read_text()
    same = {"files": None, "seconds": None}
    assert _rounded({**encode_result(got), **same}) == _rounded({**encode_result(expected), **same})

    labelmap = remote.call("load", path=lesions, timeout=TIMEOUT_S)["volume_id"]
    line = {"id": "s", "type": "track_series", "baseline_id": "v1", "followup_ids": [], "lesions_id": labelmap,
            "out_dir": "track"}
    status, body = server.raw("POST", f"/sessions/{remote.session_id}/requests", json.dumps(line).encode())
    assert status == 400 and "'followup_ids' must be a list of one or more" in json.loads(body)["message"]


def test_the_slicer_panels_session_runs_overlays_and_tracking_on_a_server(server, track_files):
    slicer_core = pytest.importorskip("slicer_core", reason="slicer-core is not installed")
    from test_lesions import volume_node

    from MedDIFTLib.slicer.scene_run import RunInputs
    from MedDIFTLib.slicer.session import WorkerSession
    from MedDIFTLib.slicer.track_run import TrackInputs

    scene = slicer_core.vtkMRMLScene()
    baseline, followup = (volume_node(scene, read_volume(track_files[name]).voxels, GEOMETRY, name=name)
                          for name in ("baseline", "followup"))
    source = volume_node(scene, read_volume(track_files["lesions"]).voxels.astype(np.uint8), GEOMETRY,
                         "vtkMRMLLabelMapVolumeNode", "source")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
    assert slicer_core.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation)
    scene.RemoveNode(source)
    settings = RunSettings(backbone="mind", device="cpu", field=parse_options(FieldOptions, TRACK_FIELD))
    panel = WorkerSession(scene, server_url=server.url, token=TOKEN)
    try:
        outputs = panel.run_scene(RunInputs(baseline, followup, compute_landmarks=False, compute_transform=True,
                                      compute_overlays=True), settings, timeout_s=TIMEOUT_S)
        tracked = panel.run_track(TrackInputs(baseline, followup, segmentation), settings, timeout_s=TIMEOUT_S)
    finally:
        panel.shutdown()
    assert sorted(outputs.overlays) == ["confidence", "jacobian", "magnitude"]
    assert sorted(outputs.overlay_summary.overlays) == ["confidence", "jacobian", "magnitude"]
    assert all(node.GetImageData().GetDimensions() == GEOMETRY.shape_ijk for node in outputs.overlays.values())
    assert [row.status for row in tracked.rows] == ["ok", "ok"]
    assert tracked.followup_lesions.GetSegmentation().GetNumberOfSegments() == 2


def test_a_dropped_stream_cancels_its_job(server, remote):
    volume = _small_volume(4, (96, 96, 96))
    body, headers = encode_volume(volume)
    status, answer = server.raw("PUT", f"/sessions/{remote.session_id}/volumes/{volume.content_hash()}",
                                body=body, headers=headers)
    assert status == 200, answer
    line = json.dumps({"id": "slow", "type": "features", "volume_id": json.loads(answer)["volume_id"],
                       "backbone": "mind", "device": "cpu"}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
    connection.request("POST", f"/v1/sessions/{remote.session_id}/requests", body=line,
                       headers={"Authorization": f"Bearer {TOKEN}"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ") and b'"progress"' in response.readline() + b'"progress"'
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        outcomes = json.loads(server.raw("GET", f"/sessions/{remote.session_id}")[1])["outcomes"]
        if "slow" in outcomes or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert outcomes.get("slow") == "cancelled"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server_killed_mid_job_is_reported_and_nothing_is_written(pair, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    port = _free_port()
    code = "import sys; from MedDIFTLib.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--token-file", str(tmp_path / "token")],
        env={**os.environ, "PYTHONPATH": PACKAGE_PARENT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = RemoteWorkerClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                client.start()
                break
            except WorkerError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        ids = {"fixed_id": client.call("load", path=pair["fixed"])["volume_id"],
               "moving_id": client.call("load", path=pair["moving"])["volume_id"]}
        out = tmp_path / "out"
        job = client.send("register", backbone="mind", device="cpu", out_transform=str(out / "field.nii.gz"),
                          out_warped=str(out / "warped.nii.gz"), **ids)
        events = client.events(job, timeout=TIMEOUT_S)
        assert isinstance(next(events), Progress)
        process.kill()
        final = list(events)[-1]
        assert isinstance(final, Error) and final.kind == "internal" and "lost the connection" in final.message
        assert not out.exists() or not list(out.iterdir())
        assert not isinstance(final, Result)
    finally:
        process.kill()
        process.wait(30)


def test_remote_client_imports_neither_torch_nor_qt():
    heavy = ("torch", "monai", "qt", "PythonQt", "PyQt5", "PySide2", "starlette", "uvicorn")
    code = (f"import sys, MedDIFTLib.worker.remote_client, MedDIFTLib.worker.http_transport, "
            f"MedDIFTLib.worker.http_session, MedDIFTLib.worker.remote.wire; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert output.stdout.strip() == "[]"


def test_cli_match_and_register_with_server_write_what_the_local_cli_writes(server, pair, tmp_path):
    from MedDIFTLib.cli import main

    (tmp_path / "token").write_text(TOKEN + "\n")
    points = tmp_path / "points.csv"
    rows = "".join(f"F-{n},{x},{y},{z}\n" for n, (x, y, z) in enumerate(pair["points"]))
    points.write_text("label,l,p,s\n" + rows)
    common = [pair["fixed"], pair["moving"], "--backbone", "mind", "--device", "cpu", "--quiet"]
    remote = ["--server", server.url, "--token-file", str(tmp_path / "token")]
    match = [*common, "--points", str(points), "--search-radius-mm", "8"]
    assert main(["match", *match, "--out", str(tmp_path / "local.csv")]) == 0
    assert main(["match", *match, "--out", str(tmp_path / "remote.csv"), *remote]) == 0
    local_rows = (tmp_path / "local.csv").read_text().splitlines()
    remote_rows = (tmp_path / "remote.csv").read_text().splitlines()
    assert len(remote_rows) == len(pair["points"]) + 1
    assert remote_rows == local_rows
    out = tmp_path / "registered"
    assert main(["register", *common, "--out-transform", str(out / "field.nii.gz"), "--grid-spacing-mm", "6",
                 "--optimise-iterations", "0", "--points", str(points), "--out-points", str(out / "carried.csv"),
                 *remote]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["carried.csv", "field.nii.gz", "field.nii.gz.json"]
    assert json.loads((out / "field.nii.gz.json").read_text())["transform"] == str(out / "field.nii.gz")


def test_tls_with_a_given_certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   capture_output=True, check=True)
    running = ThreadServer(_config(tmp_path), ssl_certfile=str(cert), ssl_keyfile=str(key))
    url = f"https://127.0.0.1:{running.port}"
    try:
        info = RemoteWorkerClient(url, token=TOKEN, ca_file=str(cert)).test_connection()
        assert info["version"] == MedDIFTLib.__version__
        with pytest.raises(WorkerError, match="cannot reach"):
            RemoteWorkerClient(url, token=TOKEN).test_connection()
    finally:
        running.stop()


def test_client_kill_mid_job_cancels_it_on_the_server(server):
    client = RemoteWorkerClient(server.url, token=TOKEN, timeout_s=TIMEOUT_S)
    client.start()
    volume = _small_volume(5, (96, 96, 96))
    body, headers = encode_volume(volume)
    status, answer = server.raw("PUT", f"/sessions/{client.session_id}/volumes/{volume.content_hash()}",
                                body=body, headers=headers)
    assert status == 200, answer
    store = server.app.state.sessions
    session = store.get(client.session_id)
    job = client.send("features", volume_id=json.loads(answer)["volume_id"], backbone="mind", device="cpu")
    events = client.events(job, timeout=TIMEOUT_S)
    assert isinstance(next(events), Progress)
    client.kill()
    final = list(events)[-1]
    assert isinstance(final, Error) and final.kind == "cancelled"
    session.thread.join(TIMEOUT_S)
    assert session.events.outcomes.get(job) == "cancelled" and not session.folder.exists()


def test_failed_token_attempts_count_against_the_rate(tmp_path):
    running = ThreadServer(_config(tmp_path, requests_per_minute=3))
    try:
        statuses = [running.raw("GET", "/info", token="guess-0123456789abcdef")[0] for _ in range(3)]
        assert statuses == [401, 401, 401]
        assert running.raw("GET", "/info")[0] == 429
    finally:
        running.stop()


# ------------------------------------------------------------------ nothing silently wrong (issue 26)


def _upload(server, session_id: str, volume: Volume, geometry: dict | None = None) -> tuple[int, dict]:
    body, headers = encode_volume(volume)
    if geometry is not None:
        headers[GEOMETRY_HEADER] = json.dumps(geometry)
    status, answer = server.raw("PUT", f"/sessions/{session_id}/volumes/{volume.content_hash()}", body=body,
                                headers=headers)
    return status, json.loads(answer)


def test_every_refusal_is_json_unknown_routes_and_a_shape_overflowing_int64_included(server, remote):
    for path in ("/nowhere", f"/sessions/{remote.session_id}/nothing/here"):
        status, body = server.raw("GET", path)
        answer = json.loads(body)
        assert status == 404 and answer["kind"] == "bad_request" and "not a route of meddift serve" in answer["message"]
    status, body = server.raw("DELETE", "/info")
    assert status == 405 and json.loads(body)["kind"] == "bad_request"
    volume = _small_volume(6)
    geometry = {"shape_ijk": [2**40, 2**40, 2**40], "spacing_mm": [1, 1, 1], "origin_lps_mm": [0, 0, 0],
                "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    status, answer = _upload(server, remote.session_id, volume, geometry)
    assert status == 400 and answer["kind"] == "bad_request" and "exceeds the server's limit" in answer["message"]


@pytest.mark.parametrize("change, message", [
    ({"direction": [2, 0, 0, 0, 2, 0, 0, 0, 2]}, "not orthonormal"),
    ({"direction": [0] * 9}, "not orthonormal"),
    ({"spacing_mm": [1e300, 1, 1]}, "voxel spacing"),
])
def test_an_upload_with_impossible_geometry_is_refused(server, remote, change, message):
    volume = _small_volume(7)
    geometry = {"shape_ijk": list(volume.geometry.shape_ijk), "spacing_mm": list(volume.geometry.spacing_mm),
                "origin_lps_mm": list(volume.geometry.origin_lps_mm), "direction": list(volume.geometry.direction),
                **change}
    status, answer = _upload(server, remote.session_id, volume, geometry)
    assert status == 400 and answer["kind"] == "bad_request" and message in answer["message"], answer


@pytest.mark.parametrize("limit_bytes", [5 * 2**20, 5 * 2**20 - 4])
def test_size_messages_never_round_both_sides_to_the_same_number(limit_bytes):
    """A volume of 5.2 MiB over a limit of 5 MiB used to read "(5 MiB of voxels) exceeds the limit of 5 MiB"."""
    volume = _small_volume(8, (52, 100, 262))  # 5.2 MiB of float32
    body, headers = encode_volume(volume)
    with pytest.raises(BadRequestError) as refused:
        decode_volume(body, headers[GEOMETRY_HEADER], "", limit_bytes)
    sizes = re.fullmatch(r"the uploaded volume \((\S+) MiB of voxels\) exceeds the server's limit of (\S+) MiB",
                         str(refused.value))
    assert sizes is not None and float(sizes[1]) > float(sizes[2]), refused.value


def test_a_session_holds_no_more_voxels_than_its_memory_limit(tmp_path):
    volume_bytes = 12 * 14 * 16 * 4
    running = ThreadServer(_config(tmp_path, session_memory_mb=int(2.5 * volume_bytes) / 2**20))
    try:
        client = RemoteWorkerClient(running.url, token=TOKEN, timeout_s=TIMEOUT_S)
        client.start()
        ids = [_upload(running, client.session_id, _small_volume(seed))[1]["volume_id"] for seed in (10, 11)]
        status, answer = _upload(running, client.session_id, _small_volume(12))
        assert status == 400 and "exceeds the room left in this session" in answer["message"]
        assert "--session-memory-mb" in answer["message"]
        assert client.call("unload", volume_id=ids[0], timeout=TIMEOUT_S)["unloaded"] is True
        assert _upload(running, client.session_id, _small_volume(12))[0] == 200
        client.stop()
    finally:
        running.stop()


def test_a_job_over_the_session_memory_limit_is_refused_before_any_work(tmp_path):
    from MedDIFTLib.core.budget import estimate_register
    from MedDIFTLib.core.options import FieldOptions, parse_options

    volume = _small_volume(13, (40, 40, 40))
    fine = {**QUICK_FIELD, "levels": [{"spacing_mm": 2.0, "search_radius_mm": 20.0}]}
    sizes = [estimate_register(volume.geometry, volume.geometry, parse_options(FieldOptions, options)).total_bytes
             for options in (QUICK_FIELD, fine)]
    running = ThreadServer(_config(tmp_path, session_memory_mb=sum(sizes) // 2 / 2**20))
    try:
        client = RemoteWorkerClient(running.url, token=TOKEN, timeout_s=TIMEOUT_S)
        client.start()
        volume_id = _upload(running, client.session_id, volume)[1]["volume_id"]
        request = {"fixed_id": volume_id, "moving_id": volume_id, "backbone": "mind", "device": "cpu",
                   "out_transform": "field.nii.gz"}
        stages = []
        with pytest.raises(MedDIFTError, match=r"register would need about .* of memory .* this session's memory "
                           r"limit \(meddift serve --session-memory-mb\): use a coarser lattice \(spacing_mm, now 2 mm"
                           ) as refused:
            client.call("register", options=fine, progress=lambda s, f, m: stages.append(s), timeout=TIMEOUT_S,
                        **request)
        assert refused.value.kind == "out_of_memory" and "features" not in stages
        out = tmp_path / "out.nii.gz"
        client.call("register", options=QUICK_FIELD, timeout=TIMEOUT_S, **{**request, "out_transform": str(out)})
        assert out.exists()
        client.stop()
    finally:
        running.stop()


def test_outputs_of_a_request_id_holding_a_slash_can_be_fetched(server, remote, tmp_path):
    volume = _small_volume(14, (24, 24, 24))
    volume_id = _upload(server, remote.session_id, volume)[1]["volume_id"]
    line = {"id": "job/1", "type": "register", "fixed_id": volume_id, "moving_id": volume_id, "backbone": "mind",
            "device": "cpu", "options": QUICK_FIELD, "out_transform": "field.nii.gz"}
    status, body = server.raw("POST", f"/sessions/{remote.session_id}/requests", json.dumps(line).encode())
    assert status == 200 and _stream_events(body)[-1]["event"] == "result", body
    for request_id in ("job%2F1", "job/1"):
        status, data = server.raw("GET", f"/sessions/{remote.session_id}/outputs/{request_id}/transform")
        assert status == 200 and len(data) > 1000
    remote._ids = itertools.chain(["/slashed/id"], itertools.count(1))  # the client's own download of such an id
    out = tmp_path / "field.nii.gz"
    remote.call("register", timeout=TIMEOUT_S, fixed_id=volume_id, moving_id=volume_id, backbone="mind",
                device="cpu", options=QUICK_FIELD, out_transform=str(out))
    assert out.exists()


def test_a_device_the_server_lacks_is_refused_without_command_line_advice(server, remote):
    for device in ("/dev/nvidia0", "cuda:7", "tpu"):
        line = {"id": "d", "type": "features", "volume_id": "v1", "backbone": "mind", "device": device}
        status, body = server.raw("POST", f"/sessions/{remote.session_id}/requests", json.dumps(line).encode())
        message = json.loads(body)["message"]
        assert status == 400 and "is not a device of this server; ask for one of auto, cpu" in message, message
        assert "--device" not in message and "<server path>" not in message


def test_a_refusal_that_is_not_meddift_json_says_so(tmp_path):
    """Another HTTP server (or a wrong path) answers 404 with plain text: the message says what happened."""
    import http.server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404, "File not found")

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        with pytest.raises(MedDIFTError, match=r"refused \(HTTP 404\): File not found; .* does not answer as meddift "
                           "serve"):
            RemoteWorkerClient(url).test_connection()
    finally:
        other.shutdown()
        other.server_close()


def test_serve_exits_cleanly_on_sigterm_and_leaves_no_temporary_folder(tmp_path):
    import signal

    port = _free_port()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    code = "import sys; from MedDIFTLib.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", str(port)],
                               env={**os.environ, "PYTHONPATH": PACKAGE_PARENT, "TMPDIR": str(temporary)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = RemoteWorkerClient(f"http://127.0.0.1:{port}", timeout_s=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                client.test_connection()
                break
            except WorkerError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert [path.name.startswith("meddift-serve-") for path in temporary.iterdir()] == [True]
        client.start()  # a session with its folder
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=TIMEOUT_S)[0].decode()
        assert process.returncode == 0, output
        assert "Traceback" not in output and "stopped" in output
        assert not list(temporary.iterdir())
    finally:
        process.kill()
        process.wait(30)
