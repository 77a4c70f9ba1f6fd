"""One way to run a command in a child process: its output read line by line, cancelled with its
whole process tree.

:class:`ChildProcess` starts a command in its own process group (a new session on POSIX, a new
process group on Windows), hands each line of its output to a callback from a reader thread
(progress events, results), keeps a bounded tail of the rest (stderr: logs, tracebacks), waits with
a timeout and cancels everything it started: SIGTERM to the group and to every descendant psutil
finds (when psutil is installed; it also finds those that left the group), then SIGKILL after a
grace period (``taskkill /T /F`` on Windows). The worker client, the Slicer module's background
commands (weights, packages) and the evaluation's isolated runs all run their children through it.

Imports neither torch nor numpy: it runs inside Slicer's process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

DEFAULT_GRACE_S = 2.0
READER_JOIN_S = 5.0
STDERR_AFTER_EXIT_S = 1.0  # how long ``on_end`` waits for stderr a surviving grandchild may still hold open
TAIL_LINES = 400

LineCallback = Callable[[str], bool | None]
EndCallback = Callable[[int], None]


def _ignore(line: str) -> bool:
    return False


class ChildProcess:
    """``command`` in a child process of its own process group; nothing runs until :meth:`start`.

    ``on_line(line)`` gets each line of the child's stdout (of stdout and stderr together when
    ``merge_stderr``), without its line ending, from a reader thread; a line it does not take
    (returns anything but True) is kept in the tail, like every line of a separate stderr (the
    last ``tail_lines``, :meth:`tail`). ``on_end(returncode)`` is called once, from the reader
    thread, after the output has ended, the child has exited and stderr has been read.
    ``stdin``: True gives the child a pipe (:meth:`write`, :meth:`close_input`), else it reads
    nothing. ``env`` and ``cwd`` as for :class:`subprocess.Popen` (None: this process's).
    """

    def __init__(
        self,
        command: Sequence[str],
        on_line: LineCallback | None = None,
        on_end: EndCallback | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stdin: bool = False,
        merge_stderr: bool = False,
        tail_lines: int = TAIL_LINES,
        name: str = "child",
    ) -> None:
        self.command = [os.fspath(part) for part in command]
        self.name = name
        self._on_line = on_line or _ignore
        self._on_end = on_end
        self._env = None if env is None else dict(env)
        self._cwd = cwd
        self._stdin = stdin
        self._merge_stderr = merge_stderr
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._stderr_reader: threading.Thread | None = None

    # ----------------------------------------------------------------- state

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has ended, else None."""
        return None if self._process is None else self._process.poll()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the child and its reader threads; returns at once. Raises OSError if it cannot start."""
        if self._process is not None:
            raise RuntimeError(f"the {self.name} process was already started")
        group: dict[str, Any] = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        )
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE if self._stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if self._merge_stderr else subprocess.PIPE,
            env=self._env,
            cwd=self._cwd,
            **group,
        )
        if not self._merge_stderr:
            self._stderr_reader = threading.Thread(target=self._read_stderr, name=f"{self.name}-err", daemon=True)
            self._threads.append(self._stderr_reader)
        self._threads.append(threading.Thread(target=self._read_stdout, name=f"{self.name}-out", daemon=True))
        for thread in self._threads:
            thread.start()

    def write(self, data: bytes) -> None:
        """Write ``data`` to the child's stdin and flush (OSError or ValueError once it is closed)."""
        if self._process is None or self._process.stdin is None:
            raise ValueError(f"the {self.name} process has no input pipe")
        with self._write_lock:
            self._process.stdin.write(data)
            self._process.stdin.flush()

    def close_input(self) -> None:
        """Close the child's stdin (end of input)."""
        if self._process is not None and self._process.stdin is not None:
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` s (None: for ever) for the child to exit; its exit code, or None
        if it still runs. Its descendants may outlive it: :meth:`cancel` ends them too."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def cancel(self, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """End the child and everything it started: SIGTERM to its process group and descendants,
        SIGKILL after ``grace_s`` s (``taskkill /T /F`` on Windows); then wait for the child and its
        output. Its exit code (None if it was never started). Does nothing to a child that has
        already exited (its group may hold another process by then)."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            descendants = _descendants(process.pid)
            _signal_tree(process, descendants, terminate=True)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            _signal_tree(process, descendants, terminate=False)
        code = process.wait()
        self.join()
        return code

    def join(self, timeout_s: float = READER_JOIN_S) -> None:
        """Wait up to ``timeout_s`` s per thread for the reader threads to read the output to its end."""
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)

    # ----------------------------------------------------------------- output

    def tail(self, max_lines: int | None = None) -> list[str]:
        """The last lines kept (stderr, and output lines ``on_line`` did not take), oldest first."""
        with self._tail_lock:
            lines = list(self._tail)
        return lines if max_lines is None else lines[-max_lines:] if max_lines > 0 else []

    def note(self, line: str) -> None:
        """Keep ``line`` in the tail as if the child had written it (e.g. why a line was not understood)."""
        with self._tail_lock:
            self._tail.append(line)

    def _read_stdout(self) -> None:
        process = self._process
        for line in _lines(process.stdout):
            if self._on_line(line) is not True:
                self.note(line)
        code = process.wait()
        if self._stderr_reader is not None:
            self._stderr_reader.join(STDERR_AFTER_EXIT_S)
        if self._on_end is not None:
            self._on_end(code)

    def _read_stderr(self) -> None:
        for line in _lines(self._process.stderr):
            self.note(line)


def _lines(stream: IO[bytes]) -> Any:
    """The lines of a binary stream as text (UTF-8, undecodable bytes replaced), without line endings."""
    for raw in stream:
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _descendants(pid: int) -> list[Any]:
    """Every process ``pid`` started, directly or not (psutil objects), if psutil is installed, else []."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _signal_tree(process: subprocess.Popen, descendants: list[Any], terminate: bool) -> None:
    """SIGTERM (``terminate``) or SIGKILL to the process group of ``process`` and to ``descendants``."""
    if os.name == "nt":  # no SIGTERM for a console tree: both steps end it by force
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for child in descendants:
        try:
            if terminate:
                child.terminate()
            else:
                child.kill()
        except Exception:  # psutil.NoSuchProcess, AccessDenied: already gone or not ours
            pass
