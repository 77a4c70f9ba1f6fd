"""The HTTP routes of ``meddift serve`` (Starlette), under :data:`.wire.API`:

- ``GET  /info``: version, device and limits (the client's "Test connection");
- ``POST /sessions``, ``GET|DELETE /sessions/{sid}``: open, describe, close a session;
- ``GET|PUT /sessions/{sid}/volumes/{content_hash}``: was this volume uploaded / upload it (:mod:`.wire`);
- ``PUT /sessions/{sid}/fields/{field_hash}``: upload a displacement field (:mod:`.wire`), held in
  memory as the ``transform_id`` an ``overlays`` request names by its hash;
- ``POST /sessions/{sid}/requests``: one protocol request line as the body, read at once as its
  typed request (a malformed or refused one is answered 400 with an ``error`` event), given the
  server's options and output paths and sent on to the session's worker as ``encode_request``
  writes it; its events come back as server-sent events (``data: {event}``), the stream ending with
  its ``result`` or ``error``; the stream closing early cancels the request;
- ``GET /sessions/{sid}/outputs/{request_id}/{name}``: an output file of a ``register`` or
  ``overlays`` request (``name``: :data:`.wire.OUTPUT_NAMES`), a ``track`` request (labelmap, csv,
  report, sheet: the files of ``meddift track``) or a ``track_series`` request (labelmap_1 ...
  labelmap_N, csv, response, report, growth, sheet), written in the session's folder (the request
  id URL-quoted; it may hold ``/``);
- ``DELETE /sessions/{sid}/outputs/{request_id}``: the client has its outputs, delete them (a request
  that fails, or whose stream is gone before it ends, has its outputs deleted at once).

Every route is rate-limited per client address (429; failed token attempts count) and needs
``Authorization: Bearer TOKEN`` when the server has a token (401 otherwise). Refusals, unknown
routes and unexpected failures alike are ``{"kind", "message"}`` JSON, never a path or a traceback.
A path-style ``load`` and ``shutdown`` are refused: volumes are uploaded, and so are the lesion
labelmap of a ``track`` or ``track_series`` (its ``lesions_id`` names the uploaded volume) and the
field of ``overlays`` (its ``transform_id`` names the upload); the server writes nothing but the
outputs a client asked for, and deletes them once downloaded. Each session may hold ``session_memory_bytes`` of uploaded
voxels, and each of its jobs is refused up front when its memory estimate
(:mod:`MedDIFTLib.core.budget`) exceeds that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ... import __version__
from ...core.budget import Budget, describe_bytes
from ...core.errors import BadInputError, BadRequestError, MedDIFTError
from ...features.maisi import packaged_configs
from ...grid.displacement_field import DisplacementField
from ..jobs import Job
from ..protocol.requests import (
    Limits,
    LoadRequest,
    ProbeRequest,
    RejectedRequest,
    encode_request,
    parse_line,
    parse_request,
)
from ..protocol.requests import Request as WireRequest
from ..protocol.results import encode_result, parse_result
from ..stream import error_event
from .security import RateLimiter, token_matches
from .sessions import INTERNAL_MESSAGE, ServerSession, SessionStore, hide_paths
from .wire import (
    API,
    CONTENT_HASH,
    GEOMETRY_HEADER,
    NAME_HEADER,
    OUTPUT_NAMES,
    decode_field,
    decode_volume,
    field_hash,
)

REMOTE_TYPES = ("probe", "unload", "features", "match", "register", "overlays", "track", "track_series", "cancel")
KEEPALIVE_S = 1.0
REAP_INTERVAL_S = 10.0
SESSION_LIMIT = "this session's memory limit (meddift serve --session-memory-mb)"


def available_devices() -> tuple[str, ...]:
    """The devices of this machine a request may name: cpu, and cuda, cuda:N for each GPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ("cpu", *(("cuda",) if count else ()), *(f"cuda:{index}" for index in range(count)))


@dataclass(frozen=True)
class ServeConfig:
    """What ``meddift serve`` was started with; sizes in bytes, times in seconds."""

    cache_dir: Path
    token: str | None = None
    device: str = "auto"
    max_upload_bytes: int = 2048 * 2**20
    max_sessions: int = 8
    idle_timeout_s: float = 1800.0
    requests_per_minute: int = 1200
    cache_bytes: int = 2 * 2**30
    limits: Limits = Limits()
    device_label: str = ""
    weights_dir: Path | None = None
    session_memory_bytes: int = 16 * 2**30
    devices: tuple[str, ...] = field(default_factory=available_devices)
    """The devices a request may name when ``device`` is ``auto`` (besides ``auto``)."""


def refusal(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"kind": kind, "message": message}, status_code=status)


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; :class:`BodyTooLarge` past ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServeConfig) -> Starlette:
    """The server's application; its sessions live in ``config.cache_dir``."""
    store = SessionStore(config.cache_dir, config.max_sessions, config.idle_timeout_s,
                         config.cache_bytes, config.limits, Budget(config.session_memory_bytes, SESSION_LIMIT))
    rate = RateLimiter(config.requests_per_minute)
    info = {
        "version": __version__,
        "api": API,
        "device": config.device,
        "device_label": config.device_label,
        "limits": {"max_upload_bytes": config.max_upload_bytes, "max_request_bytes": config.limits.max_request_bytes,
                   "max_points": config.limits.max_points, "max_sessions": config.max_sessions,
                   "session_memory_bytes": config.session_memory_bytes,
                   "idle_timeout_s": config.idle_timeout_s, "requests_per_minute": config.requests_per_minute},
    }

    def guarded(endpoint):
        async def checked(request: Request) -> Response:
            if not rate.allow(request.client.host if request.client else "?"):
                return refusal(429, "bad_request", "too many requests: slow down and retry")
            if not token_matches(config.token, request.headers.get("authorization")):
                return refusal(401, "bad_request", "missing or wrong token: give the server's token")
            if "sid" not in request.path_params:
                return await endpoint(request)
            session = store.get(request.path_params["sid"])
            if session is None:
                return refusal(404, "bad_request", "unknown or expired session: open a new one")
            try:
                return await endpoint(request, session)
            finally:
                session.touch()

        return checked

    async def get_info(request: Request) -> Response:
        return JSONResponse({**info, "sessions": len(store)})

    async def open_session(request: Request) -> Response:
        session = store.create()
        if session is None:
            return refusal(503, "bad_request", f"the server holds its limit of {config.max_sessions} sessions")
        return JSONResponse({"session_id": session.session_id, **info})

    async def describe_session(request: Request, session: ServerSession) -> Response:
        running = session.worker.jobs.running
        return JSONResponse({"volumes": len(session.worker.state.volumes),
                             "running": running.request_id if running else None,
                             "outcomes": dict(session.events.outcomes)})

    async def close_session(request: Request, session: ServerSession) -> Response:
        await asyncio.to_thread(store.close, session.session_id)
        return JSONResponse({"closed": True})

    async def find_volume(request: Request, session: ServerSession) -> Response:
        found = session.uploaded(request.path_params["content_hash"])
        if found is None:
            return refusal(404, "bad_request", "not uploaded to this session")
        return JSONResponse(found)

    async def read_upload(request: Request, content_hash: str, what: str) -> bytes | Response:
        """The body of an upload named by its 40-digit hash, or the refusal of a bad name or size."""
        if not CONTENT_HASH.fullmatch(content_hash):
            return refusal(400, "bad_request", f"{what} is named by its 40-digit content hash")
        try:
            return await read_body(request, config.max_upload_bytes)
        except BodyTooLarge:
            return refusal(413, "bad_request", f"upload over the server's limit of "
                           f"{describe_bytes(config.max_upload_bytes)}")

    async def upload_volume(request: Request, session: ServerSession) -> Response:
        content_hash = request.path_params["content_hash"]
        body = await read_upload(request, content_hash, "a volume")
        if isinstance(body, Response):
            return body
        held = session.held_bytes()
        room = config.session_memory_bytes - held
        limit, limit_name, limit_note = config.max_upload_bytes, "the server's limit", ""
        if room < limit:
            limit, limit_name = max(room, 0), "the room left in this session"
            limit_note = (f"it holds {describe_bytes(held)} of voxels (meddift serve --session-memory-mb): unload a "
                          "volume or open a new session")
        try:
            volume = await asyncio.to_thread(decode_volume, body, request.headers.get(GEOMETRY_HEADER),
                                             request.headers.get(NAME_HEADER), limit, limit_name, limit_note)
        except MedDIFTError as error:
            return refusal(400, error.kind, str(error))
        if volume.content_hash() != content_hash:
            return refusal(400, "bad_request", "the uploaded volume does not have the content hash it was sent under")
        request_id = f"upload-{content_hash[:12]}"
        queue = session.events.open(request_id, asyncio.get_running_loop())
        if queue is None:
            return refusal(409, "bad_request", "this volume is being uploaded already")
        try:
            session.worker.jobs.submit(Job(request_id, "load", LoadRequest(volume.name or "volume", volume)))
            while True:
                event = await queue.get()
                if event["event"] == "result":
                    session.uploads[content_hash] = event["result"]
                    return JSONResponse(event["result"])
                if event["event"] == "error":
                    return refusal(400, event["kind"], event["message"])
        finally:
            session.events.close(request_id)

    async def upload_field(request: Request, session: ServerSession) -> Response:
        content_hash = request.path_params["field_hash"]
        body = await read_upload(request, content_hash, "a field")
        if isinstance(body, Response):
            return body
        try:
            displacement, geometry = await asyncio.to_thread(decode_field, body, request.headers.get(GEOMETRY_HEADER),
                                                             config.max_upload_bytes)
        except MedDIFTError as error:
            return refusal(400, error.kind, str(error))
        if field_hash(displacement, geometry) != content_hash:
            return refusal(400, "bad_request", "the uploaded field does not have the hash it was sent under")
        session.add_field(content_hash, DisplacementField(displacement, geometry))
        return JSONResponse({"field": content_hash})

    async def post_request(request: Request, session: ServerSession) -> Response:
        try:
            body = await read_body(request, config.limits.max_request_bytes)
        except BodyTooLarge:
            message = f"request longer than {config.limits.max_request_bytes} bytes rejected; send fewer points"
            return JSONResponse(error_event(None, "bad_request", message), status_code=413)
        try:
            request_id, request_type, fields = parse_line(body)
            if request_type not in REMOTE_TYPES:
                raise RejectedRequest(_not_remote(request_type), request_id)
            job_request = server_options(parse_request(request_type, fields, config.limits), config)
            if request_type in OUTPUT_NAMES:
                job_request = session.output_paths(request_id, request_type, job_request)
            elif request_type in ("track", "track_series"):
                job_request = session.track_paths(request_id, job_request)
        except RejectedRequest as error:
            return JSONResponse(error_event(error.request_id, error.kind, str(error)), status_code=400)
        except BadInputError as error:
            return JSONResponse(error_event(request_id, error.kind, str(error)), status_code=400)
        queue = session.events.open(request_id, asyncio.get_running_loop())
        if queue is None:
            message = f"request id {request_id!r} is already in use by a pending request"
            return JSONResponse(error_event(request_id, "bad_request", message), status_code=409)
        request_type, fields = encode_request(job_request)
        session.worker.handle_line(json.dumps({"id": request_id, "type": request_type, **fields}).encode())
        return StreamingResponse(_stream(session, request_id, request_type, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def http_refusal(request: Request, error: HTTPException) -> Response:
        """An unknown route or method (Starlette's 404 and 405), as JSON."""
        return refusal(error.status_code, "bad_request", f"{error.detail}: {request.method} {request.url.path} is "
                       f"not a route of meddift serve (its routes start with {API}/)")

    async def failed(request: Request, error: Exception) -> Response:
        """Any unexpected failure, as a path-free JSON 500 (Starlette then re-raises it into the server's log)."""
        return refusal(500, "internal", INTERNAL_MESSAGE)

    async def get_output(request: Request, session: ServerSession) -> Response:
        path = session.outputs.file(request.path_params["request_id"], request.path_params["name"])
        if path is None:
            return refusal(404, "bad_request", "no such output of this session")
        return FileResponse(path, media_type="application/octet-stream")

    async def drop_outputs(request: Request, session: ServerSession) -> Response:
        await asyncio.to_thread(session.outputs.drop, request.path_params["request_id"])
        return JSONResponse({"deleted": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        async def reap() -> None:
            while True:
                await asyncio.sleep(min(REAP_INTERVAL_S, config.idle_timeout_s))
                await asyncio.to_thread(store.close_idle)

        reaper = asyncio.create_task(reap())
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(store.close_all)

    session_path = API + "/sessions/{sid}"
    routes = [
        Route(API + "/info", guarded(get_info), methods=["GET"]),
        Route(API + "/sessions", guarded(open_session), methods=["POST"]),
        Route(session_path, guarded(describe_session), methods=["GET"]),
        Route(session_path, guarded(close_session), methods=["DELETE"]),
        Route(session_path + "/volumes/{content_hash}", guarded(find_volume), methods=["GET"]),
        Route(session_path + "/volumes/{content_hash}", guarded(upload_volume), methods=["PUT"]),
        Route(session_path + "/fields/{field_hash}", guarded(upload_field), methods=["PUT"]),
        Route(session_path + "/requests", guarded(post_request), methods=["POST"]),
        Route(session_path + "/outputs/{request_id:path}/{name}", guarded(get_output), methods=["GET"]),
        Route(session_path + "/outputs/{request_id:path}", guarded(drop_outputs), methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_refusal, Exception: failed})
    app.state.sessions = store
    return app


def server_options(request: WireRequest, config: ServeConfig) -> WireRequest:
    """``request`` with the server's device and weights folder; refuses backbone options that would
    make the server read a file it was not started with (a weights folder, a configuration file) and
    a device the server lacks."""
    if isinstance(request, ProbeRequest):
        for options in request.backbone_options.values():
            _check_backbone_options(options)
        return request
    settings = getattr(request, "settings", None)
    if settings is None:
        return request
    _check_backbone_options(settings.backbone_options)
    if config.device == "auto" and settings.device not in ("auto", *config.devices):
        shown = repr(settings.device)[:40]
        raise BadRequestError(f"'device' {shown} is not a device of this server; ask for one of "
                              f"{', '.join(('auto', *config.devices))}")
    if config.weights_dir is not None:
        settings = dataclasses.replace(settings, backbone_options={**settings.backbone_options,
                                                                   "weights_dir": str(config.weights_dir)})
    if config.device != "auto":
        settings = dataclasses.replace(settings, device=config.device)
    return dataclasses.replace(request, settings=settings)


def _check_backbone_options(options: dict[str, Any]) -> None:
    """Refuses a weights folder and a configuration file in one backbone's options."""
    for name, value in options.items():
        option = str(name).rsplit(".", 1)[-1]
        if option == "weights_dir":
            raise BadRequestError("'weights_dir' is chosen by the server (meddift serve --weights-dir)")
        if option == "config" and not (isinstance(value, dict) or value in packaged_configs()):
            raise BadRequestError(f"'{name}' on a server must be a configuration dict or one of "
                                  f"{', '.join(packaged_configs())}")


def _not_remote(request_type: str) -> str:
    if request_type == "load":
        return "the server never reads its own files: upload the volume (RemoteWorkerClient's load does)"
    return f"'{request_type}' is not available on a server; close the session instead"


async def _stream(session: ServerSession, request_id: str, request_type: str, queue: asyncio.Queue):
    """Server-sent events of one request; leaving before its final event cancels it."""
    finished = False
    try:
        while not finished:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": waiting\n\n"
                continue
            finished = event["event"] in ("result", "error")
            if finished and event["event"] == "result":
                event = {**event, "result": _public_result(request_type, event["result"])}
            yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
    finally:
        session.events.close(request_id)
        if not finished:
            session.worker.jobs.cancel(request_id)


def _public_result(request_type: str, result: dict[str, Any]) -> dict[str, Any]:
    """What a client may see of a result: the output files of a register, overlays or track by
    their names (the client maps them to its paths), a probe without the server's process id and
    with path-free backbone messages."""
    if request_type in ("register", "overlays", "track", "track_series"):
        typed = parse_result(request_type, result)
        return encode_result(typed.moved({name: name for name in typed.output_files}))
    if request_type == "probe":
        backbones = [{**backbone, "message": hide_paths(backbone["message"])} for backbone in result["backbones"]]
        return {**{key: value for key, value in result.items() if key not in ("pid", "platform")},
                "backbones": backbones}
    return result
