"""Commands in child processes, polled from a GUI timer, without Qt and without blocking.

:class:`ChildCommand` runs one command through :class:`~MedDIFTLib.core.child.ChildProcess` (its own
process group, so :meth:`ChildCommand.cancel` ends everything it started) and keeps its last output
lines; :meth:`ChildCommand.poll` reports the end once through ``on_done(error)``. :class:`CommandChain`
runs steps one after another (the weights files to fetch, the packages to install) and reports once,
after the last step or the first one that fails or is cancelled; the panel's timer only calls
:meth:`CommandChain.poll`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..core.child import ChildProcess
from ..core.errors import CancelledError, MedDIFTError

OUTPUT_LINES_KEPT = 50
CANCEL_GRACE_S = 1.0  # SIGTERM first, SIGKILL after this: the panel waits for it
DoneCallback = Callable[[Exception | None], None]


class ChildCommand:
    """``command`` in a child process with ``environment``; ``on_done(error)`` is called once from
    :meth:`poll` or :meth:`cancel`: None on success, :class:`CancelledError` after cancel, else a
    :class:`MedDIFTError` ending with the command's last output lines. Subclasses hook into each
    output line (:meth:`_read_line`, from a reader thread; ``_lock`` guards what it writes) and into
    the end (:meth:`_clean_up`)."""

    what = "command"

    def __init__(self, command: Sequence[str], on_done: DoneCallback,
                 environment: Mapping[str, str] | None = None) -> None:
        self._command = list(command)
        self._environment = None if environment is None else dict(environment)
        self._on_done = on_done
        self._child: ChildProcess | None = None
        self._lock = threading.Lock()
        self.finished = False

    @property
    def running(self) -> bool:
        return self._child is not None and not self.finished

    def start(self) -> None:
        """Start the child; returns at once."""
        if self._child is not None:
            raise MedDIFTError(f"this {self.what} was already started")
        self._child = ChildProcess(self._command, self._take_output, env=self._environment, merge_stderr=True,
                                   tail_lines=OUTPUT_LINES_KEPT, name=f"MedDIFT {self.what}")
        try:
            self._child.start()
        except OSError as error:
            self._finish(MedDIFTError(f"could not start {self._command[0]}: {error.strerror or error}"))

    def _take_output(self, text: str) -> bool:
        """One output line of the child (reader thread), split at carriage returns (progress bars
        redrawn in place): each non-empty part goes to :meth:`_read_line`, and is kept unless that
        took it as an event."""
        for line in text.replace("\r", "\n").splitlines():
            line = line.strip()
            if line and self._read_line(line) is not True:
                self._child.note(line)
        return True

    def _read_line(self, line: str) -> bool:
        """Called (from the reader thread) with each non-empty output line; True when it took the
        line as an event, which is then left out of :meth:`output_lines`."""
        return False

    def _clean_up(self) -> None:
        """Called once the child has ended, before ``on_done``."""

    def output_lines(self) -> list[str]:
        """The command's last output lines (stdout and stderr)."""
        return [] if self._child is None else self._child.tail()

    def poll(self) -> bool:
        """True while the child runs (``on_done`` is called when it ends)."""
        if self.finished or self._child is None:
            return False
        code = self._child.returncode
        if code is None:
            return True
        self._child.join()
        self._clean_up()
        if code == 0:
            self._finish(None)
        else:
            tail = "\n".join(self.output_lines()[-8:])
            self._finish(MedDIFTError(f"the {self.what} failed (code {code})" + (f":\n{tail}" if tail else "")))
        return False

    def cancel(self) -> None:
        """End the child's process tree (SIGTERM, then SIGKILL after :data:`CANCEL_GRACE_S`);
        ``on_done`` gets CancelledError."""
        if self.finished:
            return
        if self._child is not None:
            self._child.cancel(CANCEL_GRACE_S)
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
