"""Who may use ``meddift serve`` and how much: the bind check, the token, the request rate."""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time
from pathlib import Path

from ...core.errors import BadInputError

MIN_TOKEN_CHARS = 16


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


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (its first line, stripped); refuses a missing, empty or short token."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path}: cannot read the token file ({error})") from None
    if not token or len(token[0].strip()) < MIN_TOKEN_CHARS:
        raise BadInputError(f"{path}: the token must be at least {MIN_TOKEN_CHARS} characters on its first line "
                            "(e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return token[0].strip()


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
