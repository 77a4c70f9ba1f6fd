"""The limits of ``meddift serve`` (MiB and seconds)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Options, option


@dataclass(frozen=True)
class ServeOptions(Options):
    """The limits of ``meddift serve``: uploads and memory in MiB, times in seconds."""

    max_upload_mb: float = option(2048.0, above=0.0, help="largest volume upload, MiB")
    max_sessions: int = option(8, minimum=1, help="sessions open at once")
    idle_timeout_s: float = option(1800.0, above=0.0, help="close a session and delete its data after this long "
                                   "unused, s")
    requests_per_minute: int = option(1200, minimum=1, help="requests per client address and minute")
    cache_mb: float = option(2048.0, above=0.0, help="feature cache of each session, MiB")
    session_memory_mb: float = option(16384.0, above=0.0, help="memory each session may use, MiB: the voxels it "
                                      "holds, and each job's memory estimate (refused up front when over it)")
