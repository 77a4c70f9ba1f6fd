"""Who may use ``meddift serve`` and how much: the bind check, the token, the request rate.

The token file is read by :func:`~MedDIFTLib.worker.http_session.read_token_file`, the client's.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time

from ...core.errors import BadInputError


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token."""
    if token is None and not is_loopback(host):
        raise BadInputError(f"refusing to serve on {host} without a token: give --token-file, or bind 127.0.0.1 "
                            "and reach it through an SSH tunnel")


def token_matches(expected: str | None, authorization: str | None) -> bool:
    """Whether an ``Authorization: Bearer TOKEN`` header carries ``expected`` (constant-time);
    True when the server has no token (loopback only)."""
    if expected is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return hmac.compare_digest(expected.encode(), given.strip().encode()) and scheme.lower() == "bearer"


class RateLimiter:
    """At most ``per_minute`` requests per key (a client address) over any minute: a token bucket."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one request from ``key``'s bucket; False when it is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self.per_minute / 60.0)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True
