"""Weights download and import in a background process, without Qt and without blocking.

The panel starts a :class:`WeightsTransfer` (``meddift weights download|import`` in a child
Python, never in Slicer's process, which stays torch-free), one after another in a
:class:`~.background.CommandChain` (:func:`weights_chain`), and calls its ``poll`` from a timer.
Progress is read from the file being written: the weights library writes each file through
a temporary ``.NAME.*.part*`` file beside its target (renamed only when complete and checked),
so the bytes written so far are that file's size and the rate follows from two polls. The command
also reports the fraction of the current file as the worker's JSON ``progress`` events
(``--progress json``), read with the worker client's parser
(:func:`~MedDIFTLib.worker.events.parse_event_line`) and left out of the output lines kept.
:meth:`WeightsTransfer.cancel` kills the child's process tree and removes the temporary files it
left, so a cancelled or failed transfer leaves no partial file in the weights folder.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..worker.events import Progress, parse_event_line
from .background import ChildCommand, CommandChain, DoneCallback

PART_MARKER = ".part"
PROGRESS_OPTIONS = ("--progress", "json")


def download_command(python_executable: str, weights_dir: str | os.PathLike) -> list[str]:
    """The command that downloads the registered diffusion weights into ``weights_dir`` (the
    user consented in the dialog, hence ``--yes``)."""
    return [python_executable, "-m", "MedDIFTLib", "weights", "download", "--weights-dir", str(weights_dir), "--yes",
            *PROGRESS_OPTIONS]


def import_command(python_executable: str, path: str | os.PathLike, weights_dir: str | os.PathLike) -> list[str]:
    """The command that copies a checkpoint the user has into ``weights_dir`` (layout and checksums checked)."""
    return [python_executable, "-m", "MedDIFTLib", "weights", "import", str(path), "--weights-dir", str(weights_dir),
            *PROGRESS_OPTIONS]


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
    """The fraction of a JSON ``progress`` event line of the command, else None (any other line)."""
    if not line.startswith("{"):
        return None
    try:
        event = parse_event_line(line)
    except ValueError:
        return None
    return event.fraction if isinstance(event, Progress) else None


class WeightsTransfer(ChildCommand):
    """One ``meddift weights`` command in a child process writing into ``weights_dir``.

    ``command`` is the child's argument list (:func:`download_command`, :func:`import_command`);
    ``environment`` its environment (e.g. :func:`MedDIFTLib.core.environment.child_environment`
    merged into the current one). ``on_done(error)`` is called once from :meth:`poll` or
    :meth:`cancel` (see :class:`~.background.ChildCommand`); the temporary files the command left
    are removed first. :attr:`progress` is updated by :meth:`poll`; ``clock`` gives seconds (tests).
    """

    what = "weights command"

    def __init__(
        self,
        command: Sequence[str],
        weights_dir: str | os.PathLike,
        on_done: DoneCallback,
        environment: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(command, on_done, environment)
        self.weights_dir = Path(weights_dir)
        self._clock = clock
        self._partials_before: set[Path] = set()
        self._last_sample: tuple[float, Path, int] | None = None
        self._fraction = math.nan
        self.progress = TransferProgress(0, 0.0, "")

    def start(self) -> None:
        """Start the child; returns at once."""
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self._partials_before = partial_files(self.weights_dir)
        super().start()

    def _read_line(self, line: str) -> bool:
        """A progress event updates the fraction and is not kept among the output lines."""
        fraction = _fraction_in(line)
        if fraction is None:
            return False
        with self._lock:
            self._fraction = fraction
        return True

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
        if self.running:
            self._sample()
        return super().poll()

    def _clean_up(self) -> None:
        for path in partial_files(self.weights_dir) - self._partials_before:
            path.unlink(missing_ok=True)


def format_progress(progress: TransferProgress) -> str:
    """``autoencoder_v1.pt: 12.5 MiB, 3.1 MiB/s`` (empty before the first bytes)."""
    if progress.bytes_done <= 0:
        return ""
    text = f"{progress.bytes_done / 2**20:.1f} MiB"
    if progress.rate_bytes_per_s > 0:
        text += f", {progress.rate_bytes_per_s / 2**20:.1f} MiB/s"
    return f"{progress.file_name}: {text}" if progress.file_name else text


def weights_chain(commands: Sequence[Sequence[str]], weights_dir: str | os.PathLike, on_done: DoneCallback,
                  environment: Mapping[str, str] | None = None):
    """The transfers of ``commands`` one after another into ``weights_dir``; ``on_done(error)`` once
    after the last (None) or the first that fails or is cancelled. Call ``start``, then ``poll``."""
    return CommandChain([
        lambda done, command=command: WeightsTransfer(command, weights_dir, done, environment) for command in commands
    ], on_done)
