"""The transport of a :class:`~.client.WorkerClient` whose worker is ``meddift serve`` on another
machine (HTTP or HTTPS, standard library only; imports neither torch nor Qt, so it runs inside
Slicer): what each request sends and brings back, over the session of :mod:`.http_session`.

It differs from the local worker process only where a network must: :meth:`HttpTransport.open`
opens a session, :meth:`~HttpTransport.close` closes it (the server deletes its data); a ``load``
reads the volume here and uploads it unless this session holds its content already; a
``register`` writes its outputs on the server, then downloads them to the local paths it was given
(all written atomically, only once all arrived), and then tells the server to delete them;
``overlays`` uploads its field (``transform``, read here; sent as ``transform_id``) and comes back
the same way; a ``track`` uploads its lesion labelmap as a load does (sent as ``lesions_id``) and
downloads the files of ``meddift track`` into its local ``out_dir`` the same way, and so does a
``track_series``. Each is sent as :func:`~.protocol.requests.encode_request` writes it, server-side
names in place of the local paths. A dropped connection ends each unanswered request with an
:class:`~.events.Error` (kind ``internal``; ``cancelled`` after :meth:`~HttpTransport.kill`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import threading
import urllib.parse
from typing import Any

from ..core.budget import describe_bytes
from ..core.errors import BadRequestError, CancelledError, MedDIFTError
from .events import Error, Result, WorkerError, parse_event
from .http_session import HttpSession
from .remote.wire import OUTPUT_NAMES, encode_field, encode_volume, field_hash
from .transports import Deliver, Transport, request_line


class HttpTransport(Transport):
    """One session on the server at ``url`` (``http://host:port`` or ``https://...``; the arguments
    are :class:`~.http_session.HttpSession`'s, kept as ``http``)."""

    def __init__(self, url: str, token: str | None = None, ca_file: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.http = HttpSession(url, token=token, ca_file=ca_file, timeout_s=timeout_s)
        self._deliver: Deliver | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.http.session_id is not None

    @property
    def killed(self) -> bool:
        return self.http.killed

    def open(self, deliver: Deliver, timeout: float) -> str | None:
        """Open a session on the server; its version."""
        if self.running:
            raise WorkerError("the session is already open")
        self._deliver = deliver
        return self.http.open_session(timeout).get("version")

    def close(self, timeout: float, shutdown_id: str) -> None:
        """Close the session (the server deletes its volumes and outputs); closing is its shutdown,
        so ``shutdown_id`` is not used."""
        self.http.close_session(timeout)

    def kill(self, grace: float = 2.0) -> None:
        """Drop every open connection at once (the server cancels their jobs)."""
        self.http.drop_connections()

    def stderr_tail(self, max_lines: int = 50) -> str:
        """'': the server's stderr stays on the server (its log)."""
        return ""

    # ----------------------------------------------------------------- requests

    def send_line(self, data: bytes) -> None:
        """Post one raw request line (for protocol tests) from a thread; its events are delivered as they come."""
        threading.Thread(target=self._stream, args=(None, data), daemon=True).start()

    def send(self, request_id: str, type: str, params: dict[str, Any]) -> None:
        """Run the request in a thread of its own, which delivers its events up to its final one."""
        if not self.running:
            raise WorkerError("no session is open on the server: call start() first")
        thread = threading.Thread(target=self._run, args=(request_id, type, params), daemon=True,
                                  name=f"meddift-remote-{request_id}")
        thread.start()

    def _run(self, request_id: str, type: str, params: dict[str, Any]) -> None:
        """Run one request to its final event, delivered like the local worker's."""
        try:
            if type == "load":
                self._deliver(Result(request_id, self._upload(params)))
            elif type == "register":
                self._register(request_id, params)
            elif type == "overlays":
                self._overlays(request_id, params)
            elif type in ("track", "track_series"):
                self._track(request_id, type, params)
            else:
                self._stream(request_id, request_line(request_id, type, params))
        except MedDIFTError as error:
            self._deliver(Error(request_id, error.kind, str(error)))
        except (OSError, http.client.HTTPException, ValueError) as error:
            self._deliver(self._lost(request_id, error))

    def _lost(self, request_id: str, error: Exception) -> Error:
        if self.http.killed:
            return Error(request_id, CancelledError.kind, "the request was stopped")
        reason = str(error) or type(error).__name__
        return Error(request_id, WorkerError.kind, f"lost the connection to the server {self.http.url} ({reason}); "
                     "nothing was written")

    def _upload(self, params: dict[str, Any]) -> dict[str, Any]:
        """Read the volume here; upload it unless this session holds its content; the load result."""
        from ..core.io import read_volume

        if set(params) != {"path"}:
            raise BadRequestError("a load takes only 'path': a volume file or DICOM folder on this computer")
        return self._upload_volume(read_volume(params["path"]), params["path"])

    def _upload_volume(self, volume: Any, source: str) -> dict[str, Any]:
        """Upload ``volume`` (a :class:`~MedDIFTLib.core.io.Volume` read from ``source``) unless this
        session holds its content; the load result."""
        volume_path = self.http.path(f"/volumes/{volume.content_hash()}")
        status, found = self.http.request("GET", volume_path)
        if status == 200:
            return found
        body, headers = encode_volume(volume)
        self._check_upload_size(source, body)
        return self.http.json("PUT", volume_path, body=body, headers=headers)

    def _check_upload_size(self, source: str, body: bytes) -> None:
        """Refuse, before sending, an upload of ``source`` over the server's limit."""
        limit = self.http.info.get("limits", {}).get("max_upload_bytes")
        if limit is not None and len(body) > limit:
            raise BadRequestError(f"{source}: {describe_bytes(len(body), limit)} compressed exceeds the "
                                  f"server's upload limit of {describe_bytes(limit, len(body))}")

    def _register(self, request_id: str, params: dict[str, Any]) -> None:
        """Send a register with output names only; download its outputs to the local paths."""
        from .protocol.requests import parse_request

        request = parse_request("register", params)
        local = _local_outputs("register", request)
        self._with_outputs(request_id, "register", _output_names(request, local), local)

    def _overlays(self, request_id: str, params: dict[str, Any]) -> None:
        """Upload the field (``transform``, read here) and send the overlays with its hash and output
        names only; download the overlays to the local paths."""
        from ..core.io.fields import read_field_file
        from .protocol.requests import parse_request

        request = parse_request("overlays", params)
        local = _local_outputs("overlays", request)
        sent = _output_names(request, local)
        if request.transform is not None:
            displacement, geometry = read_field_file(request.transform)
            body, headers = encode_field(displacement, geometry)
            self._check_upload_size(request.transform, body)
            uploaded = self.http.json("PUT", self.http.path(f"/fields/{field_hash(displacement, geometry)}"), body=body,
                                  headers=headers)
            sent = dataclasses.replace(sent, transform=None, transform_id=uploaded["field"])
        self._with_outputs(request_id, "overlays", sent, local)

    def _track(self, request_id: str, request_type: str, params: dict[str, Any]) -> None:
        """Upload the lesion labelmap and send the ``track`` or ``track_series`` with its volume id;
        download the files of ``meddift track`` (over a pair or a series) into the local ``out_dir``
        (nothing there changes unless all arrived)."""
        from ..core.io import read_volume
        from ..lesions.inputs import LABELMAP_SUFFIXES
        from ..lesions.outputs import check_outputs
        from ..lesions.series_outputs import check_series_outputs
        from .protocol.requests import parse_request
        from .protocol.results import parse_result

        request = parse_request(request_type, params)
        name = request.lesions.lower()
        if not name.endswith(LABELMAP_SUFFIXES) or name.endswith(".seg.nrrd"):
            raise BadRequestError(f"{request.lesions}: on a server the lesions must be a labelmap volume "
                                  f"({', '.join(s for s in LABELMAP_SUFFIXES if s != '.seg.nrrd')}); point files "
                                  "and .seg.nrrd segment names are read by a local worker only")
        if request_type == "track":
            local = check_outputs(request.out_dir)
        else:
            local = check_series_outputs(request.out_dir, len(request.followup_ids))
        labelmap = parse_result("load", self._upload_volume(read_volume(request.lesions), request.lesions))
        sent = dataclasses.replace(request, lesions=None, lesions_id=labelmap.volume_id, out_dir="track")
        self._with_outputs(request_id, request_type, sent, {key: str(path) for key, path in local.items()})

    def _with_outputs(self, request_id: str, request_type: str, sent: Any, local: dict[str, str]) -> None:
        """Send ``sent`` (a typed request naming its outputs by server-side names); once it succeeded,
        download its outputs to ``local`` (output name -> local path) and deliver its result naming them."""
        from .protocol.results import encode_result, parse_result

        final = self._stream(request_id, _line(request_id, sent), deliver_final=False)
        if isinstance(final, Result):
            try:
                self._download(request_id, local)
            finally:
                self._drop_outputs(request_id)
            final = Result(request_id, encode_result(parse_result(request_type, final.payload).moved(local)))
        self._deliver(final)

    def _drop_outputs(self, request_id: str) -> None:
        """Ask the server to delete a request's outputs (the session's closing deletes them otherwise)."""
        with contextlib.suppress(MedDIFTError, OSError, ValueError, http.client.HTTPException):
            self.http.request("DELETE", self.http.path(f"/outputs/{urllib.parse.quote(request_id, safe='')}"))

    def _download(self, request_id: str, local: dict[str, Any]) -> None:
        """Fetch each output to a temporary file beside its path; rename all once all arrived."""
        from ..core.io import atomic_output

        with contextlib.ExitStack() as stack:
            for name, path in local.items():
                tmp = stack.enter_context(atomic_output(path))
                output = f"/outputs/{urllib.parse.quote(request_id, safe='')}/{name}"
                connection, response = self.http.open("GET", self.http.path(output))
                try:
                    if response.status != 200:
                        raise self.http.refusal(response)
                    with open(tmp, "wb") as handle:
                        while chunk := response.read(2**20):
                            handle.write(chunk)
                finally:
                    self.http.done(connection)

    def _stream(self, request_id: str | None, line: bytes, deliver_final: bool = True) -> Any:
        """Post one request line and deliver its server-sent events; returns its final event."""
        connection, response = self.http.open("POST", self.http.path("/requests"), body=line,
                                          headers={"Content-Type": "application/json"})
        try:
            if response.status != 200:
                final = Error(request_id, *self.http.refusal_of(response))
                if deliver_final:
                    self._deliver(final)
                return final
            while raw := response.readline():
                if not raw.startswith(b"data: "):
                    continue
                event = parse_event(json.loads(raw[6:]))
                if isinstance(event, (Result, Error)):
                    if deliver_final:
                        self._deliver(event)
                    return event
                self._deliver(event)
            raise http.client.IncompleteRead(b"", None)
        finally:
            self.http.done(connection)


def _local_outputs(request_type: str, request: Any) -> dict[str, str]:
    """The local paths of a register or overlays request's outputs by name, checked before any work
    (one-file formats only: a two-file one cannot come back from a server)."""
    from ..core.io import check_output_path

    local = {name: path for name in OUTPUT_NAMES[request_type] if (path := getattr(request, f"out_{name}")) is not None}
    for path in local.values():
        if _ending(path) in (".nhdr", ".mhd"):
            raise BadRequestError(f"{path}: a two-file format cannot come back from a server; "
                                  "use .nii.gz, .nrrd or .mha")
        check_output_path(path)
    return local


def _output_names(request: Any, local: dict[str, str]) -> Any:
    """``request`` with each local output path replaced by the name the server takes (``name.ending``)."""
    return dataclasses.replace(request, **{f"out_{name}": f"{name}{_ending(path)}" for name, path in local.items()})


def _line(request_id: str, request: Any) -> bytes:
    """The wire line of a typed request (:mod:`.protocol`), as :func:`~.protocol.requests.encode_request` writes it."""
    from .protocol.requests import encode_request

    return request_line(request_id, *encode_request(request))


def _ending(path: str) -> str:
    """``.nii.gz`` for ``a/b.nii.gz``, ``.h5`` for ``t.h5``: the ending that chooses a file's format."""
    name = path.rsplit("/", 1)[-1].lower()
    for ending in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".h5", ".hdf5", ".tfm", ".txt"):
        if name.endswith(ending):
            return ending
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""
