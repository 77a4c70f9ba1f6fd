"""Client of ``meddift serve``, for scripts and the Slicer module: a :class:`~.client.WorkerClient`
over an :class:`~.http_transport.HttpTransport` (standard library only; imports neither torch nor
Qt). The same requests, events and errors as the local worker; see the transport for what a
network changes (uploads, downloads, sessions).
"""

from __future__ import annotations

from typing import Any

from .client import WorkerClient
from .http_transport import HttpTransport


class RemoteWorkerClient(WorkerClient):
    """A :class:`~.client.WorkerClient` with one session on the server at ``url`` (``http://host:port``
    or ``https://...``): :meth:`start` opens the session, :meth:`stop` closes it (the server deletes
    its data).

    ``token``: the server's token (sent as ``Authorization: Bearer``); ``ca_file``: the certificate
    (or its CA) to trust for HTTPS when it is not in the system's store; ``timeout_s`` bounds each
    network wait, a long job keeps its stream alive with comments.
    """

    transport: HttpTransport

    def __init__(self, url: str, token: str | None = None, ca_file: str | None = None,
                 timeout_s: float = 60.0) -> None:
        super().__init__(transport=HttpTransport(url, token=token, ca_file=ca_file, timeout_s=timeout_s))

    @property
    def url(self) -> str:
        return self.transport.http.url

    @property
    def session_id(self) -> str | None:
        """The open session's id on the server, None while none is open."""
        return self.transport.http.session_id

    @property
    def info(self) -> dict[str, Any]:
        """The server's answer to the session's opening (version, device, limits, session_id)."""
        return self.transport.http.info

    def test_connection(self) -> dict[str, Any]:
        """The server's ``info`` (version, device, device_label, limits) without opening a session;
        raises :class:`~.events.WorkerError` (unreachable) or BadRequestError (refused, e.g. the token)."""
        return self.transport.http.test_connection()
