"""Commands in child processes, polled from a GUI timer, without Qt and without blocking.

:class:`ChildCommand` runs one command (its own process group, so :meth:`ChildCommand.cancel`
kills everything it started) and keeps its last output lines; :meth:`ChildCommand.poll` reports
the end once through ``on_done(error)``. :class:`CommandChain` runs steps one after another (the
weights files to fetch, the packages to install) and reports once, after the last step or the
first one that fails or is cancelled; the panel's timer only calls :meth:`CommandChain.poll`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..core.errors import CancelledError, MedDIFTError

OUTPUT_LINES_KEPT = 50
DoneCallback = Callable[[Exception | None], None]


def kill_tree(process: subprocess.Popen) -> None:
    """Kill the child and everything it started (its own process group / job on Windows)."""
    if process.poll() is not None:
        return
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


class ChildCommand:
    """``command`` in a child process with ``environment``; ``on_done(error)`` is called once from
    :meth:`poll` or :meth:`cancel`: None on success, :class:`CancelledError` after cancel, else a
    :class:`MedDIFTError` ending with the command's last output lines. Subclasses hook into each
    output line (:meth:`_read_line`, from a reader thread) and into the end (:meth:`_clean_up`)."""

    what = "command"

    def __init__(self, command: Sequence[str], on_done: DoneCallback,
                 environment: Mapping[str, str] | None = None) -> None:
        self._command = list(command)
        self._environment = None if environment is None else dict(environment)
        self._on_done = on_done
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._lock = threading.Lock()
        self.finished = False

    @property
    def running(self) -> bool:
        return self._process is not None and not self.finished

    def start(self) -> None:
        """Start the child; returns at once."""
        if self._process is not None:
            raise MedDIFTError(f"this {self.what} was already started")
        extra = {"start_new_session": True} if sys.platform != "win32" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP
        }
        try:
            self._process = subprocess.Popen(self._command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, env=self._environment, **extra)
        except OSError as error:
            self._finish(MedDIFTError(f"could not start {self._command[0]}: {error.strerror or error}"))
            return
        self._reader = threading.Thread(target=self._read_output, name=f"MedDIFT {self.what} output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            for line in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                if line.strip():
                    with self._lock:
                        self._output.append(line.strip())
                    self._read_line(line.strip())

    def _read_line(self, line: str) -> None:
        """Called (from the reader thread) with each non-empty output line."""

    def _clean_up(self) -> None:
        """Called once the child has ended, before ``on_done``."""

    def output_lines(self) -> list[str]:
        """The command's last output lines (stdout and stderr)."""
        with self._lock:
            return list(self._output)

    def poll(self) -> bool:
        """True while the child runs (``on_done`` is called when it ends)."""
        if self.finished or self._process is None:
            return False
        code = self._process.poll()
        if code is None:
            return True
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        self._clean_up()
        if code == 0:
            self._finish(None)
        else:
            tail = "\n".join(self.output_lines()[-8:])
            self._finish(MedDIFTError(f"the {self.what} failed (code {code})" + (f":\n{tail}" if tail else "")))
        return False

    def cancel(self) -> None:
        """Kill the child's process tree; ``on_done`` gets CancelledError."""
        if self.finished:
            return
        if self._process is not None:
            kill_tree(self._process)
            if self._reader is not None:
                self._reader.join(timeout=5.0)
        self._clean_up()
        self._finish(CancelledError(f"{self.what} cancelled by the user"))

    def wait(self, timeout_s: float, poll_interval_s: float = 0.1) -> bool:
        """Poll until the command ends or ``timeout_s`` passes (scripts, tests); True if it ended."""
        deadline = time.monotonic() + timeout_s
        while self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_interval_s)
        return True

    def _finish(self, error: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._on_done(error)


class Step(Protocol):
    """What :class:`CommandChain` runs: a :class:`ChildCommand` or anything polled like one."""

    def start(self) -> None: ...

    def poll(self) -> bool: ...

    def cancel(self) -> None: ...

    def output_lines(self) -> list[str]: ...


StepFactory = Callable[[DoneCallback], Step]


class CommandChain:
    """Steps run one after another; each is made by its factory (given the step's ``on_done``) when
    its turn comes. ``on_done(error)`` is called once: None after the last step, else the first
    step's error (CancelledError after :meth:`cancel`); later steps then never start."""

    def __init__(self, factories: Sequence[StepFactory], on_done: DoneCallback) -> None:
        if not factories:
            raise MedDIFTError("a command chain needs at least one step")
        self._waiting = list(factories)
        self._on_done = on_done
        self._step_error: Exception | None = None
        self._step_ended = False
        self.current: Step | None = None
        self.lines: list[str] = []
        self.finished = False

    def start(self) -> None:
        """Start the first step; returns at once."""
        self._next()

    def _step_done(self, error: Exception | None) -> None:
        self._step_ended, self._step_error = True, error

    def _next(self) -> None:
        self._step_ended, self._step_error = False, None
        self.current = self._waiting.pop(0)(self._step_done)
        self.current.start()

    def _step_finished(self) -> bool:
        """Take in the current step's end; True when the chain is over."""
        self.lines += self.current.output_lines()
        if self._step_error is not None or not self._waiting:
            self.finished = True
            self._on_done(self._step_error)
            return True
        self._next()
        return False

    def poll(self) -> bool:
        """Advance the current step, starting the next when it succeeded; True while any step runs."""
        while not self.finished:
            if not self._step_ended:
                self.current.poll()
            if not self._step_ended:
                return True
            if self._step_finished():
                return False
        return False

    def cancel(self) -> None:
        """Cancel the current step; no later step starts."""
        if self.finished:
            return
        self._waiting.clear()
        if not self._step_ended:
            self.current.cancel()
        self._step_finished()
