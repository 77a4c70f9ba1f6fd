"""One session on ``meddift serve`` over HTTP or HTTPS (standard library only; imports neither torch
nor Qt, so it runs inside Slicer), and the token file both sides read.

:class:`HttpSession` holds what every request shares: the server's address, token and TLS
settings, the session's opening and closing, one connection per request (all dropped at once by
:meth:`HttpSession.drop_connections`), plain JSON answers and the errors of refused requests. What a
request sends and brings back is :mod:`.http_transport`'s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from ..core.errors import BadInputError, BadRequestError, CancelledError, MedDIFTError
from .events import Error, WorkerError, error_from_event
from .remote.wire import API

MIN_TOKEN_CHARS = 16


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (its first line, stripped); refuses a missing, empty or short token.
    The client reads its token with it, and ``meddift serve`` the one it expects."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path}: cannot read the token file ({error})") from None
    if not token or len(token[0].strip()) < MIN_TOKEN_CHARS:
        raise BadInputError(f"{path}: the token must be at least {MIN_TOKEN_CHARS} characters on its first line "
                            "(e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return token[0].strip()


class HttpSession:
    """The server at ``url`` (``http://host:port`` or ``https://...``) and this client's session there.

    ``token``: the server's token (sent as ``Authorization: Bearer``); ``ca_file``: the certificate
    (or its CA) to trust for HTTPS when it is not in the system's store; ``timeout_s`` bounds each
    network wait, a long job keeps its stream alive with comments.
    """

    def __init__(self, url: str, token: str | None = None, ca_file: str | None = None,
                 timeout_s: float = 60.0) -> None:
        shape = f"server URL {url!r} must look like http://host:port or https://host:port"
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BadRequestError(shape)
        try:
            port = parsed.port
        except ValueError:
            raise BadRequestError(f"{shape}, with a port from 1 to 65535") from None
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.info: dict[str, Any] = {}
        self.session_id: str | None = None
        self.killed = False
        self._host, self._port = parsed.hostname, port
        self._base = parsed.path.rstrip("/") + API
        self._tls = _tls_context(ca_file) if parsed.scheme == "https" else None
        self._connections: set[http.client.HTTPConnection] = set()

    def test_connection(self) -> dict[str, Any]:
        """The server's ``info`` (version, device, device_label, limits) without opening a session;
        raises :class:`~.events.WorkerError` (unreachable) or BadRequestError (refused, e.g. the token)."""
        return self.json("GET", "/info")

    def open_session(self, timeout_s: float) -> dict[str, Any]:
        """Open a session on the server; its answer (version, device, limits, session_id), kept as ``info``."""
        self.killed = False
        self.info = self.json("POST", "/sessions", timeout_s=timeout_s)
        self.session_id = self.info["session_id"]
        return self.info

    def close_session(self, timeout_s: float) -> None:
        """Close the session (the server deletes its volumes and outputs); a failure is ignored."""
        if self.session_id is None:
            return
        with contextlib.suppress(MedDIFTError):
            self.json("DELETE", self.path(""), timeout_s=timeout_s)
        self.session_id = None

    def drop_connections(self) -> None:
        """Drop every open connection at once (the server cancels their jobs)."""
        self.killed = True
        for connection in list(self._connections):
            if connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)

    def path(self, path: str) -> str:
        """``path`` within the open session."""
        if self.session_id is None:
            raise WorkerError("no session is open on the server")
        return f"/sessions/{self.session_id}{path}"

    def open(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout_s: float | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request on a connection of its own; the connection (give it to :meth:`done`) and
        the response, whose body is still to read."""
        timeout = timeout_s or self.timeout_s
        if self._tls is not None:
            connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        sent = dict(headers or {})
        if self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        self._connections.add(connection)
        try:
            connection.request(method, self._base + path, body=body, headers=sent)
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            self.done(connection)
            if self.killed:
                raise CancelledError("the request was stopped") from None
            raise WorkerError(f"cannot reach the server {self.url} ({error or type(error).__name__})") from None

    def done(self, connection: http.client.HTTPConnection) -> None:
        """Close a connection of :meth:`open`."""
        self._connections.discard(connection)
        connection.close()

    def request(self, method: str, path: str, **options: Any) -> tuple[int, dict[str, Any]]:
        """The status and JSON answer (``{}`` when empty) of a plain request."""
        connection, response = self.open(method, path, **options)
        try:
            data = response.read()
            return response.status, json.loads(data) if data else {}
        finally:
            self.done(connection)

    def json(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        """The JSON answer of a plain request; a refusal raises its error."""
        connection, response = self.open(method, path, **options)
        try:
            if response.status != 200:
                raise self.refusal(response)
            return json.loads(response.read())
        finally:
            self.done(connection)

    def refusal_of(self, response: http.client.HTTPResponse) -> tuple[str, str]:
        """``(kind, message)`` of a refused request (its body: ``{"kind", "message", ...}``); an
        answer without them did not come from ``meddift serve`` (another server, a proxy, a wrong path)."""
        try:
            answer = json.loads(response.read())
            kind, message = str(answer["kind"]), str(answer["message"])
        except (ValueError, TypeError, KeyError):
            kind = "internal"
            message = (f"{response.reason or 'no reason given'}; {self.url} does not answer as meddift serve "
                       "(check the address and port)")
        return kind, f"the server refused (HTTP {response.status}): {message}"

    def refusal(self, response: http.client.HTTPResponse) -> MedDIFTError:
        """The MedDIFTLib exception of a refused request."""
        return error_from_event(Error(None, *self.refusal_of(response)))


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS settings of an https server: the system's trusted certificates, or ``ca_file``'s."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error)
        raise BadRequestError(f"{ca_file}: cannot use as the server's certificate ({reason})") from None
