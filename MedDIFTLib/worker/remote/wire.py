"""What travels between :class:`~MedDIFTLib.worker.remote_client.RemoteWorkerClient` and
``meddift serve`` besides protocol lines: the routes, and volumes as zlib-compressed float32
voxels (``[k, j, i]``) with their geometry (LPS mm) in a header.

A volume is named by :meth:`MedDIFTLib.core.io.Volume.content_hash`, which the server recomputes
after decoding, so the client can ask whether it was sent before. Imports neither torch nor monai.
"""

from __future__ import annotations

import json
import math
import operator
import re
import urllib.parse
import zlib
from typing import Any

import numpy as np

from ...core.budget import describe_bytes
from ...core.errors import BadInputError, BadRequestError
from ...core.geometry import Geometry
from ...core.io import Volume, check_geometry

API = "/v1"
GEOMETRY_HEADER = "X-MedDIFT-Geometry"
NAME_HEADER = "X-MedDIFT-Name"
VOLUME_MEDIA_TYPE = "application/x-meddift-volume"
OUTPUT_NAMES = ("transform", "inverse", "warped")
"""The outputs of a ``register`` request, by the result key that names them."""
CONTENT_HASH = re.compile(r"[0-9a-f]{40}")


def encode_volume(volume: Volume) -> tuple[bytes, dict[str, str]]:
    """The upload body and headers of ``volume`` (fast zlib compression)."""
    geometry = volume.geometry
    header = {
        "shape_ijk": list(geometry.shape_ijk),
        "spacing_mm": list(geometry.spacing_mm),
        "origin_lps_mm": list(geometry.origin_lps_mm),
        "direction": list(geometry.direction),
    }
    body = zlib.compress(np.ascontiguousarray(volume.voxels, dtype="<f4").tobytes(), 1)
    headers = {
        GEOMETRY_HEADER: json.dumps(header),
        NAME_HEADER: urllib.parse.quote(volume.name[:200]),
        "Content-Type": VOLUME_MEDIA_TYPE,
    }
    return body, headers


def decode_volume(body: bytes, geometry_text: str | None, name_text: str | None, max_bytes: int,
                  limit_name: str = "the server's limit", limit_note: str = "") -> Volume:
    """The volume of an upload; refuses a bad geometry (as a file's: :func:`~MedDIFTLib.core.io.check_geometry`),
    a voxel count over ``max_bytes`` (float32; ``limit_name`` says whose limit that is, ``limit_note`` what
    to do about it), data that do
    not decompress to exactly the declared grid, and NaN or infinite voxels."""
    try:
        header: Any = json.loads(geometry_text or "")
        shape = [operator.index(n) for n in header["shape_ijk"]]
        spacing, origin, direction = header["spacing_mm"], header["origin_lps_mm"], header["direction"]
        check_geometry(spacing, origin, direction, "the uploaded volume")
    except (ValueError, TypeError, KeyError):
        raise BadRequestError(f"the upload's {GEOMETRY_HEADER} header must hold shape_ijk (3 whole numbers), "
                              "spacing_mm, origin_lps_mm and direction") from None
    except BadInputError as error:
        raise BadRequestError(str(error)) from None
    if len(shape) != 3 or min(shape) < 2:
        raise BadRequestError(f"an uploaded volume must be 3D with at least 2 voxels per axis, got {shape}")
    expected = 4 * math.prod(shape)
    if expected > max_bytes:
        raise BadRequestError(f"the uploaded volume ({describe_bytes(expected, max_bytes)} of voxels) exceeds "
                              f"{limit_name} of {describe_bytes(max_bytes, expected)}"
                              + (f"; {limit_note}" if limit_note else ""))
    geometry = Geometry.create(shape, spacing, origin, direction)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, expected + 1)
    except zlib.error:
        raise BadRequestError("the uploaded voxels are not zlib-compressed data") from None
    if len(raw) != expected or inflater.unconsumed_tail or not inflater.eof:
        raise BadRequestError(f"the uploaded voxels do not fill the declared grid {shape}")
    voxels = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape[::-1])
    if not np.isfinite(voxels).all():
        raise BadRequestError("the uploaded volume holds NaN or infinite voxels")
    return Volume(voxels, geometry, urllib.parse.unquote(name_text or "")[:200])
