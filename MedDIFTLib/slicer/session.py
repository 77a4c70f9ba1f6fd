"""The module's worker session without Qt: one worker client, its :class:`~.scene_run.WorkerFiles` and the
run in progress (a scene run, :class:`~.scene_run.SceneRun`; a tracking or series run; or a cursor
match), driven by a :class:`RunDriver`.

:class:`WorkerSession` is what the Slicer module's Logic holds. Non-blocking use (the GUI):
:meth:`WorkerSession.start_scene_run` (or ``start_track``, ``start_series``), then
:meth:`WorkerSession.poll` from a timer until it returns False; the run's ``on_done(outputs, error)``
is called once. Blocking use (scripts, tests): :meth:`WorkerSession.run_scene` (or ``run_track``,
``run_series``). The worker is started on first use and kept alive between runs, so its feature
cache makes a re-match a matter of the search alone. A run started while a cursor match is in
flight waits for it (the worker and its cache are kept), then starts. Events come typed from the
client (:mod:`MedDIFTLib.worker.events`); nothing here reads the wire.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import BadInputError, CancelledError, MedDIFTError
from ..core.options import LesionOptions, RunSettings, SeriesOptions
from ..worker.client import WorkerClient
from ..worker.events import Error, Exit, Log, Progress, Result, error_from_event
from ..worker.protocol.requests import Request, type_of
from ..worker.protocol.results import parse_result
from ..worker.remote_client import RemoteWorkerClient
from .scene_run import RunInputs, RunOutputs, SceneRun, Steps, WorkerFiles
from .series_run import SeriesInputs, SeriesOutputs, series_steps
from .track_run import TrackInputs, TrackOutputs, track_steps

ProgressCallback = Callable[[str, float, str], None]
DoneCallback = Callable[[RunOutputs | None, Exception | None], None]
LogCallback = Callable[[str, str], None]
WORKER_START_TIMEOUT_S = 180.0
SERVER_TEST_TIMEOUT_S = 10.0


def describe_server(server_url: str, token: str | None = None, timeout_s: float = SERVER_TEST_TIMEOUT_S) -> str:
    """One line for the panel's "Test connection": the server's version and device, opening no session.

    An unreachable server or a refusal (a wrong token) raises the client's one-line error.
    """
    info = RemoteWorkerClient(server_url, token=token, timeout_s=timeout_s).test_connection()
    device = info.get("device_label") or info.get("device") or "unknown device"
    return f"meddift {info.get('version', '?')} on {device}"


def run_blocking(client, steps: Steps, progress: ProgressCallback | None = None,
                 timeout_s: float | None = None) -> RunOutputs:
    """Drive a run to its end with blocking ``client.run`` requests (each step's typed request in, its
    typed result out); ``timeout_s`` bounds the wait for each worker event."""
    try:
        request = next(steps)
        while True:
            request = steps.send(client.run(request, progress, timeout_s))
    except StopIteration as finished:
        return finished.value


class RunDriver:
    """Drive a run without blocking: :meth:`poll` (from a GUI timer) handles the worker's events.

    ``on_progress(stage, fraction, message)`` and ``on_log(level, message)`` report as events
    come; ``on_done(outputs, error)`` is called once, with the outputs or the exception (a
    :class:`CancelledError` after :meth:`cancel`; an error that is no :class:`MedDIFTError`
    is a bug and arrives as it was raised).
    """

    def __init__(self, client, steps: Steps, on_done: DoneCallback, on_progress: ProgressCallback | None = None,
                 on_log: LogCallback | None = None) -> None:
        self._client = client
        self._steps = steps
        self._on_done = on_done
        self._on_progress = on_progress
        self._on_log = on_log
        self._request: Request | None = None
        self._request_id: str | None = None
        self.finished = False

    def start(self) -> None:
        """Send the first request (or finish at once when the run needs none)."""
        self._advance(lambda: next(self._steps))

    def _advance(self, step: Callable[[], Request]) -> None:
        try:
            self._request = step()
            self._request_id = self._client.submit(self._request)
        except StopIteration as finished:
            self._finish(finished.value, None)
        except Exception as error:
            self._finish(None, error)

    def _finish(self, outputs: RunOutputs | None, error: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._steps.close()
        self._on_done(outputs, error)

    def fail(self, error: Exception) -> None:
        """End the run with ``error`` before or instead of its next request."""
        self._finish(None, error)

    def poll(self) -> bool:
        """Handle the events that arrived; True while the run is still in progress."""
        if self.finished:
            return False
        for event in self._client.poll():
            if self.finished:
                break
            if isinstance(event, Log) and self._on_log is not None:
                self._on_log(event.level, event.message)
            elif isinstance(event, Exit):
                tail = self._client.stderr_tail(8).strip()
                self.fail(MedDIFTError(
                    f"the MedDIFT worker stopped unexpectedly (code {event.returncode})"
                    + (f"; its last words:\n{tail}" if tail else "")
                ))
            elif self._request_id is None or event.request_id != self._request_id:
                continue
            elif isinstance(event, Progress) and self._on_progress is not None:
                self._on_progress(event.stage, event.fraction, event.message)
            elif isinstance(event, Result):
                self._advance(lambda payload=event.payload: self._steps.send(self._result(payload)))
            elif isinstance(event, Error):
                self.fail(error_from_event(event))
        return not self.finished

    def _result(self, payload: Any):
        """The typed result of the request in flight from its result payload."""
        return parse_result(type_of(self._request), payload)

    def cancel(self) -> None:
        """Stop now: the worker's whole process tree is killed and nothing reaches the scene."""
        if self.finished:
            return
        self._client.kill()
        self._finish(None, CancelledError("cancelled by the user"))


@dataclass
class _QueuedRun:
    """A run's steps and callbacks, waiting for the cursor match in flight."""

    steps: Steps
    on_done: DoneCallback
    on_progress: ProgressCallback | None
    on_log: LogCallback | None


class WorkerSession:
    """One worker process (started on first use), its files (:class:`WorkerFiles`, in a temporary
    folder removed by :meth:`shutdown`) and at most one run in progress, for scene ``scene``.

    ``python_executable`` and ``environment`` are those of the worker process (the folder
    holding ``MedDIFTLib`` is put first on its PYTHONPATH). With ``server_url`` the work runs on
    a ``meddift serve`` server instead (:class:`RemoteWorkerClient`, ``token`` its token);
    ``client_factory`` replaces either client (tests).
    """

    def __init__(
        self,
        scene,
        python_executable: str | None = None,
        environment: Mapping[str, str] | None = None,
        start_timeout_s: float = WORKER_START_TIMEOUT_S,
        client_factory: Callable[[], Any] | None = None,
        server_url: str | None = None,
        token: str | None = None,
    ) -> None:
        self.scene = scene
        self.start_timeout_s = start_timeout_s
        self.server_url = server_url
        if client_factory is None and server_url is not None:
            client_factory = lambda: RemoteWorkerClient(server_url, token=token)  # noqa: E731
        self._client_factory = client_factory or (
            lambda: WorkerClient(python_executable=python_executable,
                                 env=None if environment is None else dict(environment))
        )
        self._client = None
        self._folder: WorkerFiles | None = None
        self._runner: RunDriver | None = None
        self._runner_is_cursor = False
        self._queued: _QueuedRun | None = None
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None

    @property
    def worker_running(self) -> bool:
        return self._client is not None and self._client.running

    @property
    def worker_busy(self) -> bool:
        """True while anything runs in the worker (a run or a cursor match) or a run waits."""
        return (self._runner is not None and not self._runner.finished) or self._queued is not None

    @property
    def run_in_progress(self) -> bool:
        """True while a scene, tracking or series run (not a cursor match) runs or waits for the
        cursor match in flight; the panel's Apply then reads Cancel."""
        return self._queued is not None or (self.worker_busy and not self._runner_is_cursor)

    @property
    def folder(self) -> WorkerFiles:
        if self._folder is None:
            self._folder = WorkerFiles(tempfile.mkdtemp(prefix="MedDIFT-"))
        return self._folder

    def _check_idle(self) -> None:
        """Refuse a second run; a cursor match in flight is no obstacle (the run waits for it)."""
        if self.run_in_progress:
            raise MedDIFTError("a MedDIFT run is already in progress")

    def _steps(self, inputs: RunInputs, settings: RunSettings, control_point_indices: Sequence[int] | None) -> Steps:
        self._check_idle()
        return SceneRun(self.scene, inputs, settings, self.folder).steps(control_point_indices)

    def _new_client(self):
        """A fresh worker client; volumes loaded by an earlier worker are forgotten."""
        if self._client is not None:
            self._client.kill()
        self.folder.clear()
        self._client = self._client_factory()
        return self._client

    def start_scene_run(self, inputs: RunInputs, settings: RunSettings, on_done: DoneCallback,
                        on_progress: ProgressCallback | None = None, on_log: LogCallback | None = None,
                        control_point_indices: Sequence[int] | None = None) -> None:
        """Check the inputs, then run the scene run (:class:`~.scene_run.SceneRun`: landmarks,
        transform, warped volume, overlays) in the background (starting the worker if needed).

        ``control_point_indices``: re-match only these fixed control points (live propagation).
        Raises :class:`MedDIFTError` at once for bad inputs or when a run is already in progress;
        everything later reaches ``on_done``, called from :meth:`poll` or :meth:`cancel`.
        """
        self._start(self._steps(inputs, settings, control_point_indices), on_done, on_progress, on_log)

    def start_cursor_match(self, inputs: RunInputs, settings: RunSettings, fixed_ras: Sequence[float],
                           on_done: DoneCallback) -> None:
        """Match one fixed point (RAS mm) in the background for the correspondence cursor; the scene
        is not changed and ``on_done(outputs, error)`` gets ``outputs.matches`` (one row)."""
        if self.worker_busy:
            raise MedDIFTError("the MedDIFT worker is busy")
        steps = SceneRun(self.scene, inputs, settings, self.folder).cursor_steps(fixed_ras)
        self._start(steps, on_done, None, None, cursor=True)

    def _check_lesions_here(self, lesions) -> None:
        self._check_idle()
        if self.server_url is not None and lesions is not None and lesions.IsA("vtkMRMLMarkupsNode"):
            raise BadInputError("lesion points (markups) are tracked on this computer only: choose 'Compute on: "
                                "this computer', or give a segmentation of the lesions")

    def _track_steps(self, inputs: TrackInputs, settings: RunSettings, options: LesionOptions | None) -> Steps:
        self._check_lesions_here(inputs.baseline_lesions)
        return track_steps(self.scene, inputs, settings, self.folder, options)

    def start_track(self, inputs: TrackInputs, settings: RunSettings, on_done: DoneCallback,
                    on_progress: ProgressCallback | None = None, on_log: LogCallback | None = None,
                    options: LesionOptions | None = None) -> None:
        """Track the baseline lesions in the background (:func:`~.track_run.track_steps`);
        ``on_done(outputs, error)`` gets a :class:`~.track_run.TrackOutputs`. Bad inputs raise at once."""
        self._start(self._track_steps(inputs, settings, options), on_done, on_progress, on_log)

    def run_track(self, inputs: TrackInputs, settings: RunSettings, options: LesionOptions | None = None,
                  progress: ProgressCallback | None = None, timeout_s: float | None = None) -> TrackOutputs:
        """Track the baseline lesions and wait; the scene is unchanged on failure."""
        return self._wait(self._track_steps(inputs, settings, options), progress, timeout_s)

    def _series_steps(self, inputs: SeriesInputs, settings: RunSettings, options: LesionOptions | None,
                      series_options: SeriesOptions | None) -> Steps:
        self._check_lesions_here(inputs.baseline_lesions)
        return series_steps(self.scene, inputs, settings, self.folder, options, series_options)

    def start_series(self, inputs: SeriesInputs, settings: RunSettings, on_done: DoneCallback,
                     on_progress: ProgressCallback | None = None, on_log: LogCallback | None = None,
                     options: LesionOptions | None = None, series_options: SeriesOptions | None = None) -> None:
        """Track the baseline lesions through the follow-ups in the background (:func:`~.series_run.series_steps`);
        ``on_done(outputs, error)`` gets a :class:`~.series_run.SeriesOutputs`. Bad inputs raise at once."""
        self._start(self._series_steps(inputs, settings, options, series_options), on_done, on_progress, on_log)

    def run_series(self, inputs: SeriesInputs, settings: RunSettings, options: LesionOptions | None = None,
                   series_options: SeriesOptions | None = None, progress: ProgressCallback | None = None,
                   timeout_s: float | None = None) -> SeriesOutputs:
        """Track the baseline lesions through the follow-ups and wait; the scene is unchanged on failure."""
        return self._wait(self._series_steps(inputs, settings, options, series_options), progress, timeout_s)

    def _start(self, steps: Steps, on_done: DoneCallback, on_progress: ProgressCallback | None,
               on_log: LogCallback | None, cursor: bool = False) -> None:
        if self.worker_busy:  # a cursor match is in flight: the run starts when it ends (see poll)
            self._queued = _QueuedRun(steps, on_done, on_progress, on_log)
            return
        client = self._client if self.worker_running else self._new_client()
        self._runner = RunDriver(client, steps, on_done=on_done, on_progress=on_progress, on_log=on_log)
        self._runner_is_cursor = cursor
        if self.worker_running:
            self._runner.start()
            return
        self._start_error = None

        def start_worker() -> None:
            try:
                client.start(timeout=self.start_timeout_s)
            except Exception as error:
                self._start_error = error

        self._starter = threading.Thread(target=start_worker, name="MedDIFT worker start", daemon=True)
        self._starter.start()

    def poll(self) -> bool:
        """Advance the run in progress (call from a GUI timer); False once it has ended (and no run waits)."""
        if self._advance_runner():
            return True
        queued, self._queued = self._queued, None
        if queued is None:
            return False
        self._start(queued.steps, queued.on_done, queued.on_progress, queued.on_log)
        return self._advance_runner()

    def _advance_runner(self) -> bool:
        runner = self._runner
        if runner is None or runner.finished:
            return False
        if self._starter is not None:
            if self._starter.is_alive():
                return True
            self._starter = None
            error = self._start_error
            if error is None and not self.worker_running:
                error = MedDIFTError("the MedDIFT worker did not start")
            if error is not None:
                runner.fail(error if isinstance(error, MedDIFTError) else MedDIFTError(str(error)))
                return False
            runner.start()
        return runner.poll()

    def cancel(self) -> None:
        """Stop the run: one waiting for a cursor match is dropped (the worker keeps its cache); a
        running one kills the worker's process tree. It ends with CancelledError; the scene is unchanged."""
        queued, self._queued = self._queued, None
        if queued is not None:
            queued.steps.close()
            queued.on_done(None, CancelledError("cancelled by the user"))
        elif not self._runner_is_cursor:
            self._kill_runner()

    def _kill_runner(self) -> None:
        """End what runs in the worker (a run or a cursor match) by killing the worker's process tree."""
        runner = self._runner
        if runner is None or runner.finished:
            return
        if self._starter is not None:
            self._client.kill()
            self._starter.join()
            self._starter = None
        runner.cancel()

    def run_scene(self, inputs: RunInputs, settings: RunSettings, control_point_indices: Sequence[int] | None = None,
                  progress: ProgressCallback | None = None, timeout_s: float | None = None) -> RunOutputs:
        """Run the scene run and wait for it; raises :class:`MedDIFTError` on failure, leaving the scene unchanged.

        ``progress(stage, fraction, message)`` receives progress; ``timeout_s`` bounds the wait
        for each worker event.
        """
        return self._wait(self._steps(inputs, settings, control_point_indices), progress, timeout_s)

    def _wait(self, steps: Steps, progress: ProgressCallback | None, timeout_s: float | None):
        """Drive ``steps`` to their outputs in this thread, starting the worker if needed."""
        if self.worker_busy:
            steps.close()
            raise MedDIFTError("the MedDIFT worker is busy")
        if not self.worker_running:
            self._new_client().start(timeout=self.start_timeout_s)
        return run_blocking(self._client, steps, progress=progress, timeout_s=timeout_s)

    def shutdown(self) -> None:
        """Stop the worker and delete its files."""
        self.cancel()
        self._kill_runner()
        if self._client is not None:
            self._client.stop()
            self._client = None
        if self._folder is not None:
            shutil.rmtree(self._folder.path, ignore_errors=True)
            self._folder = None
