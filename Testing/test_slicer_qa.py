"""Visual QA in Slicer without Qt: the weights transfer in a background process, live-propagation
change detection, the landmark QA table, the correspondence cursor and the QA overlay volumes
(scene parts against slicer-core's real MRML)."""

from __future__ import annotations

import http.server
import sys
import threading
import time

import numpy as np
import pytest

from MedDIFTLib.core.environment import child_environment
from MedDIFTLib.core.errors import CancelledError, MedDIFTError
from MedDIFTLib.slicer import weights_transfer

SLOW_CHUNK_BYTES = 64 * 1024
SLOW_CHUNKS_MAX = 400


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Sends a large body slowly; stops after a bounded number of chunks or when the client goes away."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(SLOW_CHUNK_BYTES * SLOW_CHUNKS_MAX * 4))
        self.end_headers()
        try:
            for _ in range(SLOW_CHUNKS_MAX):
                self.wfile.write(b"\0" * SLOW_CHUNK_BYTES)
                self.wfile.flush()
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def slow_server():
    """A download server on 127.0.0.1 answering one request (or waiting at most 30 s), then stopping."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.timeout = 30.0
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/autoencoder_v1.pt"
    thread.join(timeout=35.0)
    server.server_close()


def _download_command(url: str, folder) -> list[str]:
    """The library's real download (atomic write into the weights folder), from ``url``."""
    script = (
        "import sys, urllib.request\n"
        "from MedDIFTLib.weights import download_file\n"
        "download_file('autoencoder_v1.pt', sys.argv[1], opener=lambda request: urllib.request.urlopen(sys.argv[2]))\n"
    )
    return [sys.executable, "-c", script, str(folder), url]


def test_weights_download_runs_in_the_background_reports_bytes_and_rate_and_cancels_cleanly(slow_server, tmp_path):
    folder = tmp_path / "weights"
    outcomes = []
    transfer = weights_transfer.WeightsTransfer(
        _download_command(slow_server, folder), folder, outcomes.append, environment=child_environment()
    )
    started = time.monotonic()
    transfer.start()
    assert time.monotonic() - started < 5.0, "start must return at once"
    seen = []
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and transfer.poll():
        if transfer.progress.rate_bytes_per_s > 0:
            seen.append(transfer.progress)
            if len(seen) >= 2:
                break
        time.sleep(0.1)
    assert transfer.running, f"the download ended early: {transfer.output_lines()}"
    assert seen and seen[-1].bytes_done >= SLOW_CHUNK_BYTES
    assert seen[-1].file_name == "autoencoder_v1.pt"
    assert seen[-1].bytes_done >= seen[0].bytes_done
    assert weights_transfer.partial_files(folder), "the download writes through a temporary file"
    assert "MiB/s" in weights_transfer.format_progress(seen[-1])

    transfer.cancel()
    assert len(outcomes) == 1 and isinstance(outcomes[0], CancelledError)
    assert not transfer.running and not transfer.poll()
    assert list(folder.iterdir()) == [], "a cancelled download leaves nothing in the weights folder"


def test_weights_transfer_failure_reports_the_command_output_and_leaves_no_file(tmp_path):
    folder = tmp_path / "weights"
    outcomes = []
    transfer = weights_transfer.WeightsTransfer(
        [sys.executable, "-c", "import sys; print('download: 50% half'); sys.exit('no network here')"],
        folder,
        outcomes.append,
    )
    transfer.start()
    assert transfer.wait(timeout_s=60.0)
    assert len(outcomes) == 1 and isinstance(outcomes[0], MedDIFTError)
    assert "no network here" in str(outcomes[0]) and "code 1" in str(outcomes[0])
    assert list(folder.iterdir()) == []


def test_weights_transfer_that_cannot_start_fails_once(tmp_path):
    outcomes = []
    transfer = weights_transfer.WeightsTransfer([str(tmp_path / "no-such-python")], tmp_path, outcomes.append)
    transfer.start()
    assert len(outcomes) == 1 and isinstance(outcomes[0], MedDIFTError)
    assert not transfer.poll()


def test_weights_commands_are_the_cli_in_a_child_python(tmp_path):
    command = weights_transfer.download_command("/opt/PythonSlicer", tmp_path)
    assert command[:5] == ["/opt/PythonSlicer", "-m", "MedDIFTLib", "weights", "download"]
    assert "--yes" in command and str(tmp_path) in command and command[-2:] == ["--progress", "json"]
    imported = weights_transfer.import_command("/opt/PythonSlicer", tmp_path / "a.pt", tmp_path)
    assert imported[3:6] == ["weights", "import", str(tmp_path / "a.pt")] and imported[-2:] == ["--progress", "json"]


def test_the_cli_json_progress_is_what_a_transfer_reads_and_keeps_out_of_its_output(tmp_path, capsys):
    """``meddift weights ... --progress json`` writes the worker's progress events (once per whole
    percent); the transfer reads their fraction with the worker client's parser, keeps other lines."""
    from MedDIFTLib.cli.weights import _JsonProgress

    report = _JsonProgress()
    for fraction in (0.1, 0.101, 0.4):
        report("download", fraction, "autoencoder_v1.pt: 1.0 MiB")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert [weights_transfer._fraction_in(line) for line in lines] == [pytest.approx(0.1), pytest.approx(0.4)]
    assert weights_transfer._fraction_in("saved to x") is None
    assert weights_transfer._fraction_in("download: 40% autoencoder_v1.pt") is None
    assert weights_transfer._fraction_in('{"id": null, "event": "log", "level": "info", "message": "x"}') is None
    script = f"import sys; [print(line) for line in {[*lines, 'saved to x']!r}]"
    transfer = weights_transfer.WeightsTransfer([sys.executable, "-c", script], tmp_path / "w", [].append)
    transfer.start()
    assert transfer.wait(timeout_s=60.0)
    assert transfer.output_lines() == ["saved to x"] and transfer._fraction == pytest.approx(0.4)


def test_partial_names():
    from pathlib import Path

    assert weights_transfer._file_target_name(Path(".diff_unet_3d_ddpm.pt.k2j_9x.part.pt")) == "diff_unet_3d_ddpm.pt"
    assert np.isnan(weights_transfer.TransferProgress(0, 0.0, "").fraction)


def test_worker_overlays_of_a_translation_are_on_the_fixed_grid(tmp_path):
    """The worker's ``overlays`` request: lattice confidence, Jacobian 1 and the translation's
    magnitude for a constant field, written on the fixed grid; a bad request names the field."""
    pytest.importorskip("torch")
    from MedDIFTLib.core.errors import BadRequestError
    from MedDIFTLib.core.geometry import Geometry
    from MedDIFTLib.core.io import Volume, read_volume
    from MedDIFTLib.field import write_field
    from MedDIFTLib.grid.displacement_field import DisplacementField
    from MedDIFTLib.worker import handlers
    from MedDIFTLib.worker.protocol.requests import Limits, parse_request
    from MedDIFTLib.worker.state import WorkerState

    rng = np.random.default_rng(3)
    noise = rng.normal(size=(24, 24, 24))
    from scipy import ndimage

    fixed_voxels = (ndimage.gaussian_filter(noise, 2.0) * 3000.0).astype(np.float32)
    geometry = Geometry.create((24, 24, 24), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    moving_voxels = np.roll(fixed_voxels, 2, axis=2)  # +2 voxels in i: moving = fixed shifted by +4 mm in L
    state = WorkerState(0, Limits(), log=lambda level, message: None)
    fixed_id = state.add(Volume(fixed_voxels, geometry, name="fixed"))
    moving_id = state.add(Volume(moving_voxels, geometry, name="moving"))
    translation = np.array([4.0, 0.0, 0.0], np.float32)
    write_field(DisplacementField(np.broadcast_to(translation, (24, 24, 24, 3)).copy(), geometry),
                tmp_path / "field.nrrd")
    fields = {
        "fixed_id": fixed_id, "moving_id": moving_id, "backbone": "mind", "device": "cpu",
        "transform": str(tmp_path / "field.nrrd"),
        "lattice": {"spacing_mm": 8.0, "search_radius_mm": 6.0},
        **{f"out_{name}": str(tmp_path / f"{name}.nrrd") for name in ("confidence", "jacobian", "magnitude")},
    }
    result = handlers.HANDLERS["overlays"](state, parse_request("overlays", fields), lambda *args: None)
    for name in ("confidence", "jacobian", "magnitude"):
        written = read_volume(tmp_path / f"{name}.nrrd")
        assert written.geometry.same_grid(geometry), name
        assert result[name]["path"] == str(tmp_path / f"{name}.nrrd")
    np.testing.assert_allclose(read_volume(tmp_path / "jacobian.nrrd").voxels, 1.0, atol=1e-4)
    np.testing.assert_allclose(read_volume(tmp_path / "magnitude.nrrd").voxels, 4.0, atol=1e-4)
    confidence = read_volume(tmp_path / "confidence.nrrd").voxels
    assert 0.0 <= confidence.min() and confidence.max() <= 1.0
    assert result["confidence"]["mean"] > 0.3, "matches along a correct field are confident"

    with pytest.raises(BadRequestError, match="need the field"):
        parse_request("overlays", {**fields, "transform": None})
    with pytest.raises(BadRequestError, match="out_confidence"):
        parse_request("overlays", {key: value for key, value in fields.items() if key != "out_confidence"})


def test_library_qa_overlays_are_the_lattice_confidence_and_the_field_on_the_fixed_grid():
    """:func:`MedDIFTLib.field.overlays.qa_overlays` without the worker: float32 maps on the fixed grid;
    confidence is the level's lattice (matched along the field, the level's match options) resampled to
    the fixed grid; Jacobian and magnitude are those of the field, resampled first when it lies on
    another grid; without a field, confidence only (from identity)."""
    pytest.importorskip("torch")
    from scipy import ndimage

    from MedDIFTLib.core.geometry import Geometry
    from MedDIFTLib.core.io import Volume
    from MedDIFTLib.core.options import FieldLevel, MatchOptions
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.field import jacobian_determinant
    from MedDIFTLib.field.overlays import OVERLAY_NAMES, qa_overlays
    from MedDIFTLib.grid.displacement_field import DisplacementField
    from MedDIFTLib.grid.sampling import resample
    from MedDIFTLib.matching import match_lattice

    level = FieldLevel(spacing_mm=8.0, search_radius_mm=6.0, aggregation_nodes=1)
    assert level.match_options() == MatchOptions(search_radius_mm=6.0, coarse_step_mm=8.0)
    assert FieldLevel(step_mm=2.0).match_options().coarse_step_mm == 2.0

    rng = np.random.default_rng(3)
    fixed_voxels = (ndimage.gaussian_filter(rng.normal(size=(24, 24, 24)), 2.0) * 3000.0).astype(np.float32)
    geometry = Geometry.create((24, 24, 24), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    mind = create_featurizer("mind")
    fixed = mind.extract(Volume(fixed_voxels, geometry, name="fixed"))
    moving = mind.extract(Volume(np.roll(fixed_voxels, 2, axis=2), geometry, name="moving"))
    k, j, i = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    smooth = DisplacementField(
        np.stack([4.0 + np.sin(i / 5.0), np.cos(j / 7.0), 0.5 * np.sin(k / 4.0)], -1).astype(np.float32), geometry
    )
    coarse_grid = Geometry.create((10, 9, 11), (5.0, 5.5, 4.5), (-1.0, 0.5, 2.0), np.eye(3))
    kk, jj, ii = np.meshgrid(np.arange(11), np.arange(9), np.arange(10), indexing="ij")
    coarse = DisplacementField(np.stack([3.0 + 0.2 * ii, 0.1 * jj * kk, -0.3 * kk], -1).astype(np.float32), coarse_grid)

    def lattice_confidence(field):
        lattice = match_lattice(fixed, moving, 8.0, level.match_options(), field, 1)
        return resample(lattice.on_grid(lattice.matches.confidence)[None], lattice.grid, geometry)[0].numpy()

    overlays = qa_overlays(fixed, moving, level, smooth)
    assert tuple(overlays) == OVERLAY_NAMES
    assert all(v.dtype == np.float32 and v.shape == geometry.shape_kji for v in overlays.values())
    assert 0.0 <= overlays["confidence"].min() and overlays["confidence"].max() <= 1.0
    np.testing.assert_array_equal(overlays["confidence"], lattice_confidence(smooth))
    np.testing.assert_array_equal(overlays["jacobian"], jacobian_determinant(smooth))
    np.testing.assert_array_equal(overlays["magnitude"], np.linalg.norm(smooth.displacement_lps_mm, axis=-1))

    overlays = qa_overlays(fixed, moving, level, coarse)
    on_fixed = DisplacementField.from_tensor(resample(coarse.as_tensor(), coarse_grid, geometry), geometry)
    np.testing.assert_array_equal(overlays["confidence"], lattice_confidence(coarse))
    np.testing.assert_array_equal(overlays["jacobian"], jacobian_determinant(on_fixed))
    np.testing.assert_array_equal(overlays["magnitude"], np.linalg.norm(on_fixed.displacement_lps_mm, axis=-1))

    overlays = qa_overlays(fixed, moving, level)
    assert list(overlays) == ["confidence"]
    np.testing.assert_array_equal(overlays["confidence"], lattice_confidence(None))


def _print_command(text: str, code: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import sys; print({text!r}); sys.exit({code})"]


def test_chained_weight_imports_each_run_and_report_once_at_the_end(tmp_path):
    """Two files chosen in the dialog: the second import is polled to its end, then the job reruns once."""
    outcomes = []
    chain = weights_transfer.weights_chain([_print_command("first"), _print_command("second")], tmp_path,
                                           outcomes.append)
    chain.start()
    assert outcomes == [], "starting the transfers does not rerun the job"
    deadline = time.monotonic() + 60.0
    while chain.poll():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert outcomes == [None] and chain.lines == ["first", "second"]
    assert not chain.poll() and outcomes == [None], "reported once"


def test_a_failed_or_cancelled_weight_import_stops_the_chain(tmp_path):
    outcomes = []
    chain = weights_transfer.weights_chain([_print_command("bad file", 2), _print_command("never run")], tmp_path,
                                           outcomes.append)
    chain.start()
    deadline = time.monotonic() + 60.0
    while chain.poll():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(outcomes) == 1 and "bad file" in str(outcomes[0]) and "never run" not in chain.lines
    cancelled = []
    chain = weights_transfer.weights_chain([[sys.executable, "-c", "import time; time.sleep(60)"],
                                            _print_command("no")], tmp_path, cancelled.append)
    chain.start()
    chain.cancel()
    assert len(cancelled) == 1 and isinstance(cancelled[0], CancelledError) and not chain.poll()
