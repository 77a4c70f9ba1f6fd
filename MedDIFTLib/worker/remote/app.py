"""The HTTP routes of ``meddift serve`` (Starlette), under :data:`.wire.API`:

- ``GET  /info``: version, device and limits (the client's "Test connection");
- ``POST /sessions``, ``GET|DELETE /sessions/{sid}``: open, describe, close a session;
- ``GET|PUT /sessions/{sid}/volumes/{content_hash}``: was this volume uploaded / upload it (:mod:`.wire`);
- ``PUT /sessions/{sid}/fields/{field_hash}``: upload a displacement field (:mod:`.wire`), held in
  memory as the ``transform_id`` an ``overlays`` request names by its hash;
- ``POST /sessions/{sid}/requests``: one protocol request line as the body, read at once as its
  typed request (a malformed or refused one is answered 400 with an ``error`` event), given the
  server's options (:mod:`.config`) and output paths (:mod:`.sessions`) and handed to the session's
  worker as it is; its events come back as server-sent events (:mod:`.event_stream`), the stream
  ending with its ``result`` or ``error``; the stream closing early cancels the request;
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
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...core.budget import Budget, describe_bytes
from ...core.errors import BadInputError, MedDIFTError
from ...grid.displacement_field import DisplacementField
from ..protocol.requests import LoadRequest, RejectedRequest, parse_line
from ..stream import error_event
from .config import ServeConfig, remote_request, server_info, server_options
from .event_stream import request_events
from .security import RateLimiter, token_matches
from .sessions import INTERNAL_MESSAGE, ServerSession, SessionStore
from .wire import API, CONTENT_HASH, GEOMETRY_HEADER, NAME_HEADER, decode_field, decode_volume, field_hash

REAP_INTERVAL_S = 10.0
SESSION_LIMIT = "this session's memory limit (meddift serve --session-memory-mb)"

Endpoint = Callable[..., Awaitable[Response]]


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
    routes = ServerRoutes(config)
    app = Starlette(routes=routes.table(), lifespan=routes.lifespan,
                    exception_handlers={HTTPException: routes.http_refusal, Exception: routes.failed})
    app.state.sessions = routes.store
    return app


class ServerRoutes:
    """The endpoints of one server (see the module's list), over its :class:`~.sessions.SessionStore`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = SessionStore(config.cache_dir, config.options.max_sessions, config.options.idle_timeout_s,
                                  config.cache_bytes, config.limits, Budget(config.session_memory_bytes, SESSION_LIMIT))
        self.rate = RateLimiter(config.options.requests_per_minute)
        self.info = server_info(config)

    def table(self) -> list[Route]:
        """Every route, each behind :meth:`guarded`."""
        guarded = self.guarded
        session_path = API + "/sessions/{sid}"
        return [
            Route(API + "/info", guarded(self.get_info), methods=["GET"]),
            Route(API + "/sessions", guarded(self.open_session), methods=["POST"]),
            Route(session_path, guarded(self.describe_session), methods=["GET"]),
            Route(session_path, guarded(self.close_session), methods=["DELETE"]),
            Route(session_path + "/volumes/{content_hash}", guarded(self.find_volume), methods=["GET"]),
            Route(session_path + "/volumes/{content_hash}", guarded(self.upload_volume), methods=["PUT"]),
            Route(session_path + "/fields/{field_hash}", guarded(self.upload_field), methods=["PUT"]),
            Route(session_path + "/requests", guarded(self.post_request), methods=["POST"]),
            Route(session_path + "/outputs/{request_id:path}/{name}", guarded(self.get_output), methods=["GET"]),
            Route(session_path + "/outputs/{request_id:path}", guarded(self.drop_outputs), methods=["DELETE"]),
        ]

    def guarded(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the rate limit and the token; a route under ``/sessions/{sid}`` is
        given its open session (404 for an unknown one), touched when the endpoint is done."""
        async def checked(request: Request) -> Response:
            if not self.rate.allow(request.client.host if request.client else "?"):
                return refusal(429, "bad_request", "too many requests: slow down and retry")
            if not token_matches(self.config.token, request.headers.get("authorization")):
                return refusal(401, "bad_request", "missing or wrong token: give the server's token")
            if "sid" not in request.path_params:
                return await endpoint(request)
            session = self.store.get(request.path_params["sid"])
            if session is None:
                return refusal(404, "bad_request", "unknown or expired session: open a new one")
            try:
                return await endpoint(request, session)
            finally:
                session.touch()

        return checked

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Close idle sessions every :data:`REAP_INTERVAL_S` s (or the idle timeout, if shorter) while
        the server runs; close them all when it stops."""
        async def reap() -> None:
            while True:
                await asyncio.sleep(min(REAP_INTERVAL_S, self.config.options.idle_timeout_s))
                await asyncio.to_thread(self.store.close_idle)

        reaper = asyncio.create_task(reap())
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(self.store.close_all)

    # ----------------------------------------------------------------- the server and its sessions

    async def get_info(self, request: Request) -> Response:
        return JSONResponse({**self.info, "sessions": len(self.store)})

    async def open_session(self, request: Request) -> Response:
        session = self.store.create()
        if session is None:
            return refusal(503, "bad_request",
                           f"the server holds its limit of {self.config.options.max_sessions} sessions")
        return JSONResponse({"session_id": session.session_id, **self.info})

    async def describe_session(self, request: Request, session: ServerSession) -> Response:
        running = session.worker.jobs.running
        return JSONResponse({"volumes": len(session.worker.state.volumes),
                             "running": running.request_id if running else None,
                             "outcomes": dict(session.events.outcomes)})

    async def close_session(self, request: Request, session: ServerSession) -> Response:
        await asyncio.to_thread(self.store.close, session.session_id)
        return JSONResponse({"closed": True})

    # ----------------------------------------------------------------- uploads

    async def find_volume(self, request: Request, session: ServerSession) -> Response:
        found = session.uploaded(request.path_params["content_hash"])
        if found is None:
            return refusal(404, "bad_request", "not uploaded to this session")
        return JSONResponse(found)

    async def read_upload(self, request: Request, content_hash: str, what: str) -> bytes | Response:
        """The body of an upload named by its 40-digit hash, or the refusal of a bad name or size."""
        if not CONTENT_HASH.fullmatch(content_hash):
            return refusal(400, "bad_request", f"{what} is named by its 40-digit content hash")
        try:
            return await read_body(request, self.config.max_upload_bytes)
        except BodyTooLarge:
            return refusal(413, "bad_request", f"upload over the server's limit of "
                           f"{describe_bytes(self.config.max_upload_bytes)}")

    async def upload_volume(self, request: Request, session: ServerSession) -> Response:
        content_hash = request.path_params["content_hash"]
        body = await self.read_upload(request, content_hash, "a volume")
        if isinstance(body, Response):
            return body
        held = session.held_bytes()
        room = self.config.session_memory_bytes - held
        limit, limit_name, limit_note = self.config.max_upload_bytes, "the server's limit", ""
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
            session.worker.accept(request_id, "load", LoadRequest(volume.name or "volume", volume))
            while True:
                event = await queue.get()
                if event["event"] == "result":
                    session.uploads[content_hash] = event["result"]
                    return JSONResponse(event["result"])
                if event["event"] == "error":
                    return refusal(400, event["kind"], event["message"])
        finally:
            session.events.close(request_id)

    async def upload_field(self, request: Request, session: ServerSession) -> Response:
        content_hash = request.path_params["field_hash"]
        body = await self.read_upload(request, content_hash, "a field")
        if isinstance(body, Response):
            return body
        try:
            displacement, geometry = await asyncio.to_thread(decode_field, body, request.headers.get(GEOMETRY_HEADER),
                                                             self.config.max_upload_bytes)
        except MedDIFTError as error:
            return refusal(400, error.kind, str(error))
        if field_hash(displacement, geometry) != content_hash:
            return refusal(400, "bad_request", "the uploaded field does not have the hash it was sent under")
        session.add_field(content_hash, DisplacementField(displacement, geometry))
        return JSONResponse({"field": content_hash})

    # ----------------------------------------------------------------- requests and their outputs

    async def post_request(self, request: Request, session: ServerSession) -> Response:
        limits = self.config.limits
        try:
            body = await read_body(request, limits.max_request_bytes)
        except BodyTooLarge:
            message = f"request longer than {limits.max_request_bytes} bytes rejected; send fewer points"
            return JSONResponse(error_event(None, "bad_request", message), status_code=413)
        try:
            request_id, request_type, fields = parse_line(body)
            job_request = server_options(remote_request(request_id, request_type, fields, limits), self.config)
            job_request = session.place_outputs(request_id, request_type, job_request)
        except RejectedRequest as error:
            return JSONResponse(error_event(error.request_id, error.kind, str(error)), status_code=400)
        except BadInputError as error:
            return JSONResponse(error_event(request_id, error.kind, str(error)), status_code=400)
        queue = session.events.open(request_id, asyncio.get_running_loop())
        if queue is None:
            message = f"request id {request_id!r} is already in use by a pending request"
            return JSONResponse(error_event(request_id, "bad_request", message), status_code=409)
        session.worker.accept(request_id, request_type, job_request)
        return StreamingResponse(request_events(session, request_id, request_type, queue),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def get_output(self, request: Request, session: ServerSession) -> Response:
        path = session.outputs.file(request.path_params["request_id"], request.path_params["name"])
        if path is None:
            return refusal(404, "bad_request", "no such output of this session")
        return FileResponse(path, media_type="application/octet-stream")

    async def drop_outputs(self, request: Request, session: ServerSession) -> Response:
        await asyncio.to_thread(session.outputs.drop, request.path_params["request_id"])
        return JSONResponse({"deleted": True})

    # ----------------------------------------------------------------- failures

    async def http_refusal(self, request: Request, error: HTTPException) -> Response:
        """An unknown route or method (Starlette's 404 and 405), as JSON."""
        return refusal(error.status_code, "bad_request", f"{error.detail}: {request.method} {request.url.path} is "
                       f"not a route of meddift serve (its routes start with {API}/)")

    async def failed(self, request: Request, error: Exception) -> Response:
        """Any unexpected failure, as a path-free JSON 500 (Starlette then re-raises it into the server's log)."""
        return refusal(500, "internal", INTERNAL_MESSAGE)
