"""Progress reporting shared by all pipeline stages.

A progress callback receives ``(stage, fraction, message)`` with ``fraction`` in [0, 1].
It may raise :class:`MedDIFTLib.core.errors.CancelledError` to stop the job at that point.
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, stage: str, fraction: float, message: str = "") -> None: ...


def no_progress(stage: str, fraction: float, message: str = "") -> None:
    """A progress callback that ignores every report."""


def scaled(progress: ProgressFn, start: float, stop: float) -> ProgressFn:
    """Map a sub-task's [0, 1] progress into [start, stop] of the parent's."""

    def report(stage: str, fraction: float, message: str = "") -> None:
        progress(stage, start + (stop - start) * min(max(fraction, 0.0), 1.0), message)

    return report

