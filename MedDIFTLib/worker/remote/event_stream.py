"""The server-sent events of one request of ``meddift serve``: its worker's events as ``data:
{event}`` lines up to its ``result`` or ``error``, a comment every :data:`KEEPALIVE_S` seconds
while nothing comes, and its result as a client may see it (:func:`public_result`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ..protocol.results import encode_result, parse_result
from .sessions import ServerSession, hide_paths

KEEPALIVE_S = 1.0


async def request_events(session: ServerSession, request_id: str, request_type: str,
                         queue: asyncio.Queue) -> AsyncIterator[str]:
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
                event = {**event, "result": public_result(request_type, event["result"])}
            yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
    finally:
        session.events.close(request_id)
        if not finished:
            session.worker.jobs.cancel(request_id)


def public_result(request_type: str, result: dict[str, Any]) -> dict[str, Any]:
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
