"""The worker client without the worker: typed events parsed from the wire, error kinds mapped to
exceptions, :class:`WorkerClient` routing events of a stand-in worker process (a short Python
script speaking the protocol), and the child-process runner it starts the worker with
(:class:`~MedDIFTLib.core.child.ChildProcess`: lines, tail, cancelling the whole tree), all without torch."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from MedDIFTLib.core.child import ChildProcess
from MedDIFTLib.core.errors import (
    BadInputError,
    BadRequestError,
    CancelledError,
    MedDIFTError,
    MissingWeightsError,
    OutOfMemoryError,
)
from MedDIFTLib.worker.client import WorkerClient
from MedDIFTLib.worker.events import (
    Error,
    Exit,
    Log,
    Progress,
    Ready,
    Result,
    WorkerError,
    error_from_event,
    parse_event,
)
from MedDIFTLib.worker.protocol.requests import CancelRequest, LoadRequest, encode_request, type_of
from MedDIFTLib.worker.transports import Transport

TIMEOUT_S = 30


# ------------------------------------------------------------------------------------ events


def test_each_wire_event_becomes_its_typed_event():
    assert parse_event({"id": None, "event": "ready", "version": "0.1.0", "pid": 12}) == Ready("0.1.0", 12)
    assert parse_event({"id": "r1", "event": "progress", "stage": "match", "fraction": 0.25, "message": "3/12"}) == (
        Progress("r1", "match", 0.25, "3/12")
    )
    assert parse_event({"id": "r1", "event": "log", "level": "warning", "message": "slow"}) == Log("r1", "warning",
                                                                                                  "slow")
    assert parse_event({"id": "r1", "event": "result", "result": {"volume_id": "v1"}}) == Result("r1",
                                                                                                {"volume_id": "v1"})
    assert parse_event({"id": "r2", "event": "error", "kind": "bad_input", "message": "no such file"}) == (
        Error("r2", "bad_input", "no such file")
    )


def test_wire_defaults_and_bounds():
    assert parse_event({"id": "r1", "event": "result"}) == Result("r1", {})
    assert parse_event({"id": "r1", "event": "progress", "stage": "load", "fraction": 1.5}).fraction == 1.0
    assert parse_event({"id": "r1", "event": "progress", "stage": "load", "fraction": None}).fraction == 0.0
    assert parse_event({"id": "r1", "event": "error"}) == Error("r1", "internal", "worker error")


def test_a_malformed_final_event_still_ends_its_request():
    event = parse_event({"id": "r3", "event": "result", "result": [1, 2]})
    assert isinstance(event, Error) and event.request_id == "r3" and event.kind == "internal"
    assert "malformed result" in event.message


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"id": "r1", "event": "party"}, "unknown worker event 'party'"),
        ({"id": 7, "event": "result"}, "is not text"),
        ({"id": "r1", "event": "progress", "fraction": "half"}, "is not a number"),
    ],
)
def test_what_is_no_worker_event_is_refused(wire, message):
    with pytest.raises(ValueError, match=message):
        parse_event(wire)


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [
        ("bad_request", BadRequestError),
        ("bad_input", BadInputError),
        ("missing_weights", MissingWeightsError),
        ("out_of_memory", OutOfMemoryError),
        ("cancelled", CancelledError),
        ("internal", WorkerError),
        ("something new", WorkerError),
    ],
)
def test_error_kinds_map_to_the_library_errors(kind, error_class):
    error = error_from_event(Error("r1", kind, "what went wrong"))
    assert type(error) is error_class and isinstance(error, MedDIFTError)
    assert str(error) == "what went wrong"


# ------------------------------------------------------------------------------------ client


STAND_IN_WORKER = textwrap.dedent(
    '''
    import json, sys

    def emit(event):
        sys.stdout.write(json.dumps(event) + "\\n")
        sys.stdout.flush()

    emit({"id": None, "event": "ready", "version": "stand-in", "pid": 1})
    for line in sys.stdin:
        request = json.loads(line)
        request_id, kind = request["id"], request["type"]
        if kind == "echo":
            emit({"id": request_id, "event": "progress", "stage": "echo", "fraction": 0.5, "message": "half"})
            emit({"id": None, "event": "log", "level": "info", "message": "between jobs"})
            sys.stdout.write("not json\\n")
            emit({"id": request_id, "event": "party"})
            emit({"id": request_id, "event": "result", "result": {"echo": request.get("value")}})
        elif kind == "fail":
            emit({"id": request_id, "event": "error", "kind": request["kind"], "message": "failed on purpose"})
        elif kind == "die":
            sys.exit(3)
        elif kind == "shutdown":
            emit({"id": request_id, "event": "result", "result": {"shutdown": True}})
            break
    '''
)


@pytest.fixture
def stand_in_client(tmp_path):
    """A client whose 'python -m MedDIFTLib.worker' runs the stand-in worker script instead."""
    if os.name == "nt":
        pytest.skip("the stand-in interpreter is a POSIX shell script")
    script = tmp_path / "stand_in_worker.py"
    script.write_text(STAND_IN_WORKER)
    interpreter = tmp_path / "python"
    interpreter.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}"\n')
    interpreter.chmod(interpreter.stat().st_mode | stat.S_IXUSR)
    client = WorkerClient(python_executable=str(interpreter))
    client.start(timeout=TIMEOUT_S)
    yield client
    client.kill()


def test_call_returns_the_payload_and_reports_typed_progress(stand_in_client):
    assert stand_in_client.version == "stand-in"
    progress = []
    result = stand_in_client.call("echo", progress=lambda *args: progress.append(args), timeout=TIMEOUT_S, value=[1, 2])
    assert result == {"echo": [1, 2]}
    assert progress == [("echo", 0.5, "half")]
    assert "not a worker event" in stand_in_client.stderr_tail() and "party" in stand_in_client.stderr_tail()


def test_events_and_poll_yield_typed_events(stand_in_client):
    request_id = stand_in_client.send("echo", value="x")
    events = list(stand_in_client.events(request_id, timeout=TIMEOUT_S))
    assert events == [Progress(request_id, "echo", 0.5, "half"), Result(request_id, {"echo": "x"})]
    assert Log(None, "info", "between jobs") in stand_in_client.poll()


def test_an_error_event_raises_the_error_of_its_kind(stand_in_client):
    with pytest.raises(MissingWeightsError, match="failed on purpose"):
        stand_in_client.call("fail", timeout=TIMEOUT_S, kind="missing_weights")
    assert stand_in_client.call("echo", timeout=TIMEOUT_S) == {"echo": None}


def test_a_dying_worker_answers_every_request_and_says_it_exited(stand_in_client):
    request_id = stand_in_client.send("die")
    final = list(stand_in_client.events(request_id, timeout=TIMEOUT_S))[-1]
    assert isinstance(final, Error) and final.kind == "internal" and "exited (code 3)" in final.message
    received = []
    deadline = time.monotonic() + TIMEOUT_S
    while Exit(3) not in received:
        assert time.monotonic() < deadline, f"no exit event, got {received}"
        received += stand_in_client.poll()
        time.sleep(0.01)
    with pytest.raises(WorkerError, match="not running"):
        stand_in_client.call("echo")


def test_the_client_stops_the_worker_cleanly(stand_in_client):
    assert stand_in_client.stop(timeout=TIMEOUT_S) == 0
    assert not stand_in_client.running


class ScriptedTransport(Transport):
    """A transport without a worker: it records what it was sent; the test delivers the events."""

    def __init__(self) -> None:
        self.deliver = None
        self.sent: list[tuple[str, str, dict]] = []
        self.closed_with: str | None = None
        self.is_open = False
        self.was_killed = False

    @property
    def running(self) -> bool:
        return self.is_open

    @property
    def killed(self) -> bool:
        return self.was_killed

    def open(self, deliver, timeout):
        self.deliver, self.is_open, self.was_killed = deliver, True, False
        return "scripted"

    def send(self, request_id, type, params):
        if not self.is_open:
            raise WorkerError("closed")
        self.sent.append((request_id, type, params))

    def send_line(self, data):
        self.sent.append((None, "raw", {"line": data}))

    def close(self, timeout, shutdown_id):
        self.closed_with, self.is_open = shutdown_id, False
        return 0

    def kill(self, grace):
        self.was_killed = True

    def stderr_tail(self, max_lines):
        return "last words\n"


def test_one_client_routes_any_transport_and_answers_requests_its_worker_left():
    transport = ScriptedTransport()
    client = WorkerClient(transport=transport)
    client.start()
    assert client.version == "scripted" and client.running
    first, second = client.send("echo", value=1), client.send("echo", value=2)
    assert [(request_id, params) for request_id, _, params in transport.sent] == [(first, {"value": 1}),
                                                                                 (second, {"value": 2})]
    transport.deliver(Progress(first, "echo", 0.5, ""))
    transport.deliver(Result(first, {"echo": 1}))
    transport.deliver(Exit(5))
    events = client.poll()
    assert events[:2] == [Progress(first, "echo", 0.5, ""), Result(first, {"echo": 1})]
    assert events[2].request_id == second and events[2].kind == "internal"
    assert "exited (code 5)" in events[2].message and "last words" in events[2].message
    assert events[3] == Exit(5)


def test_after_kill_the_unanswered_requests_are_cancelled_and_the_transport_closed():
    transport = ScriptedTransport()
    client = WorkerClient(transport=transport)
    client.start()
    request_id = client.send("echo")
    client.kill()
    assert transport.was_killed and not client.running and transport.closed_with is not None
    transport.deliver(Exit(-15))
    assert client.poll()[0] == Error(request_id, "cancelled", "the worker was stopped\nworker stderr:\nlast words")
    with pytest.raises(WorkerError):
        client.send("echo")


def test_stop_cancels_each_unanswered_request_then_closes_with_a_fresh_id():
    transport = ScriptedTransport()
    client = WorkerClient(transport=transport)
    client.start()
    request_id = client.send("echo")
    assert client.stop() == 0
    assert transport.sent[-1][1:] == ("cancel", {"job_id": request_id})
    assert transport.closed_with not in {sent[0] for sent in transport.sent}
    with pytest.raises(ValueError, match="either a transport"):
        WorkerClient(python_executable=sys.executable, transport=transport)


def test_cancel_sends_the_typed_cancel_request_as_encode_request_writes_it():
    transport = ScriptedTransport()
    client = WorkerClient(transport=transport)
    client.start()
    for job_id in ("r7", None):
        cancel_id = client.cancel(job_id)
        assert transport.sent[-1] == (cancel_id, *encode_request(CancelRequest(job_id)))
    assert [sent[2] for sent in transport.sent] == [{"job_id": "r7"}, {}]


def test_submit_sends_a_typed_request_as_encode_request_writes_it():
    transport = ScriptedTransport()
    client = WorkerClient(transport=transport)
    client.start()
    load = LoadRequest("/data/ct.nii.gz")
    request_id = client.submit(load)
    assert transport.sent[-1] == (request_id, *encode_request(load)) and type_of(load) == "load"


def test_the_client_and_its_events_import_without_torch():
    code = (
        "import sys, MedDIFTLib.worker.client, MedDIFTLib.worker.events\n"
        "print(sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S,
                               check=True)
    assert completed.stdout.strip() == "[]"


# ------------------------------------------------------------- the child-process runner


def test_child_process_hands_out_lines_keeps_the_rest_in_its_tail_and_reports_its_end():
    """Lines the callback takes are not kept; the others and stderr are; the end comes once, with the code."""
    script = "import sys; print('event'); print('plain'); print('warning', file=sys.stderr); sys.exit(3)"
    taken, ends = [], []

    def take_events(line: str) -> bool:
        if line == "event":
            taken.append(line)
            return True
        return False

    child = ChildProcess([sys.executable, "-c", script], take_events, ends.append, name="test-child")
    child.start()
    assert child.wait(TIMEOUT_S) == 3
    child.join()
    assert taken == ["event"] and ends == [3]
    assert sorted(child.tail()) == ["plain", "warning"] and len(child.tail(1)) == 1
    assert child.cancel() == 3 and ends == [3], "cancelling an ended child does nothing more"


_TREE = """\
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL, after the grace period, ends this one
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
in_group = subprocess.Popen(sleeper)
left_group = subprocess.Popen(sleeper, start_new_session=True)
print(in_group.pid, left_group.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX")
def test_cancel_ends_the_whole_process_tree_even_a_child_that_ignores_sigterm():
    psutil = pytest.importorskip("psutil")
    lines = []
    child = ChildProcess([sys.executable, "-c", _TREE], lines.append, name="test-tree")
    child.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not lines and child.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lines, f"the stand-in never started its children: {child.tail()}"
    pids = [int(pid) for pid in lines[0].split()]

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        assert child.cancel(grace_s=0.5) == -signal.SIGKILL
        assert not child.running
        deadline = time.monotonic() + TIMEOUT_S
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if alive(pid)], "a grandchild outlived the cancel"
    finally:
        for pid in pids:
            if alive(pid):
                psutil.Process(pid).kill()
