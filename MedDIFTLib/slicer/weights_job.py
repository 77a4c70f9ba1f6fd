"""Weights download and import in a background process, without Qt and without blocking.

The panel starts a :class:`WeightsTransfer` (``meddift weights download|import`` in a child
Python, never in Slicer's process, which stays torch-free) and calls :meth:`WeightsTransfer.poll`
from a timer. Progress is read from the file being written: the weights library writes each
file through a temporary ``.NAME.*.part*`` file beside its target (renamed only when complete
and checked), so the bytes written so far are that file's size and the rate follows from two
polls. :meth:`WeightsTransfer.cancel` kills the child's process tree and removes the temporary
files it left, so a cancelled or failed transfer leaves no partial file in the weights folder.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CancelledError, MedDIFTError

OUTPUT_LINES_KEPT = 50
PART_MARKER = ".part"
_PERCENT = re.compile(r"^\w+:\s*(\d+(?:\.\d+)?)%")


def download_command(python_executable: str, weights_dir: str | os.PathLike) -> list[str]:
    """The command that downloads the registered diffusion weights into ``weights_dir`` (the
    user consented in the dialog, hence ``--yes``)."""
    return [python_executable, "-m", "MedDIFTLib", "weights", "download", "--weights-dir", str(weights_dir), "--yes"]


def import_command(python_executable: str, path: str | os.PathLike, weights_dir: str | os.PathLike) -> list[str]:
    """The command that copies a checkpoint the user has into ``weights_dir`` (layout and checksums checked)."""
    return [python_executable, "-m", "MedDIFTLib", "weights", "import", str(path), "--weights-dir", str(weights_dir)]


def partial_files(folder: Path) -> set[Path]:
    """Temporary files of unfinished writes in ``folder`` (``.NAME.<random>.part<suffix>``)."""
    if not folder.is_dir():
        return set()
    return {path for path in folder.iterdir() if path.name.startswith(".") and PART_MARKER in path.name}


@dataclass(frozen=True)
class TransferProgress:
    """Where a transfer stands: ``bytes_done`` of the file being written (bytes), ``rate_bytes_per_s``
    over the last poll (0 until two polls saw it), ``file_name`` (the target's name, or empty),
    ``fraction`` of the current file in [0, 1] as the command last reported it (NaN: not known)."""

    bytes_done: int
    rate_bytes_per_s: float
    file_name: str
    fraction: float = math.nan


def _file_target_name(part: Path) -> str:
    """``autoencoder_v1.pt`` for ``.autoencoder_v1.pt.abc123.part.pt``."""
    return part.name[1:].split(PART_MARKER)[0].rsplit(".", 1)[0]


def _fraction_in(line: str) -> float | None:
    """The fraction of a ``stage: 40% ...`` progress line of the command, else None."""
    found = _PERCENT.match(line)
    return None if found is None else min(max(float(found.group(1)) / 100.0, 0.0), 1.0)


def _kill_tree(process: subprocess.Popen) -> None:
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


class WeightsTransfer:
    """One ``meddift weights`` command in a child process writing into ``weights_dir``.

    ``command`` is the child's argument list (:func:`download_command`, :func:`import_command`);
    ``environment`` its environment (e.g. :func:`MedDIFTLib.core.environment.child_environment`
    merged into the current one). ``on_done(error)`` is called once from :meth:`poll` or
    :meth:`cancel`: None on success, a :class:`CancelledError` after cancel, else a
    :class:`MedDIFTError` with the command's last output lines. ``clock`` gives seconds (tests).
    """

    def __init__(
        self,
        command: Sequence[str],
        weights_dir: str | os.PathLike,
        on_done: Callable[[Exception | None], None],
        environment: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.weights_dir = Path(weights_dir)
        self._command = list(command)
        self._environment = None if environment is None else dict(environment)
        self._on_done = on_done
        self._clock = clock
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._lock = threading.Lock()
        self._partials_before: set[Path] = set()
        self._last_sample: tuple[float, Path, int] | None = None
        self._fraction = math.nan
        self.progress = TransferProgress(0, 0.0, "")
        self.finished = False

    @property
    def running(self) -> bool:
        return self._process is not None and not self.finished

    def start(self) -> None:
        """Start the child; returns at once."""
        if self._process is not None:
            raise MedDIFTError("this weights transfer was already started")
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self._partials_before = partial_files(self.weights_dir)
        extra = {"start_new_session": True} if sys.platform != "win32" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP
        }
        try:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._environment,
                **extra,
            )
        except OSError as error:
            self._finish(MedDIFTError(f"could not start {self._command[0]}: {error.strerror or error}"))
            return
        self._reader = threading.Thread(target=self._read_output, name="MedDIFT weights output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            for line in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                if line.strip():
                    fraction = _fraction_in(line.strip())
                    with self._lock:
                        self._output.append(line.strip())
                        if fraction is not None:
                            self._fraction = fraction

    def output_lines(self) -> list[str]:
        """The command's last output lines (stdout and stderr)."""
        with self._lock:
            return list(self._output)

    def _sample(self) -> None:
        """Bytes written so far (the newest temporary file's size) and the rate since the last sample."""
        sizes = {}
        for part in partial_files(self.weights_dir) - self._partials_before:
            try:
                status = part.stat()
            except FileNotFoundError:  # renamed or removed since the listing
                continue
            sizes[part] = (status.st_mtime, status.st_size)
        if not sizes:
            return
        part = max(sizes, key=lambda path: sizes[path][0])
        size = sizes[part][1]
        now = self._clock()
        rate = 0.0
        if self._last_sample is not None and self._last_sample[1] == part and now > self._last_sample[0]:
            rate = max(size - self._last_sample[2], 0) / (now - self._last_sample[0])
        self._last_sample = (now, part, size)
        with self._lock:
            fraction = self._fraction
        self.progress = TransferProgress(size, rate, _file_target_name(part), fraction)

    def poll(self) -> bool:
        """Update :attr:`progress`; True while the child runs (``on_done`` is called when it ends)."""
        if self.finished or self._process is None:
            return False
        self._sample()
        code = self._process.poll()
        if code is None:
            return True
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        self._remove_partials()
        if code == 0:
            self._finish(None)
        else:
            tail = "\n".join(self.output_lines()[-8:])
            self._finish(MedDIFTError(f"the weights command failed (code {code})" + (f":\n{tail}" if tail else "")))
        return False

    def cancel(self) -> None:
        """Kill the child's process tree and remove its temporary files; ``on_done`` gets CancelledError."""
        if self.finished:
            return
        if self._process is not None:
            _kill_tree(self._process)
            if self._reader is not None:
                self._reader.join(timeout=5.0)
        self._remove_partials()
        self._finish(CancelledError("weights transfer cancelled by the user"))

    def wait(self, timeout_s: float, poll_interval_s: float = 0.1) -> bool:
        """Poll until the transfer ends or ``timeout_s`` passes (scripts, tests); True if it ended."""
        deadline = time.monotonic() + timeout_s
        while self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_interval_s)
        return True

    def _remove_partials(self) -> None:
        for path in partial_files(self.weights_dir) - self._partials_before:
            path.unlink(missing_ok=True)

    def _finish(self, error: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._on_done(error)


def format_progress(progress: TransferProgress) -> str:
    """``autoencoder_v1.pt: 12.5 MiB, 3.1 MiB/s`` (empty before the first bytes)."""
    if progress.bytes_done <= 0:
        return ""
    text = f"{progress.bytes_done / 2**20:.1f} MiB"
    if progress.rate_bytes_per_s > 0:
        text += f", {progress.rate_bytes_per_s / 2**20:.1f} MiB/s"
    return f"{progress.file_name}: {text}" if progress.file_name else text
