"""What travels between :class:`~MedDIFTLib.worker.remote_client.RemoteWorkerClient` and
``meddift serve`` besides protocol lines: the routes, the names of a request's outputs, and
volumes as zlib-compressed float32 voxels (``[k, j, i]``) with their geometry (LPS mm) in a
header; a displacement field the same way, its three LPS mm components last (``[k, j, i, 3]``).

A volume is named by :meth:`MedDIFTLib.core.io.Volume.content_hash`, a field by
:func:`field_hash`, which the server recomputes after decoding, so the client can ask whether a
volume was sent before. Imports neither torch nor monai.
"""

from __future__ import annotations

import hashlib
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
OUTPUT_NAMES = {"register": ("transform", "inverse", "warped"), "overlays": ("confidence", "jacobian", "magnitude")}
"""The outputs of a request written to the files its ``out_{name}`` fields name, by type; each
``name`` is also the result key that reports it."""
CONTENT_HASH = re.compile(r"[0-9a-f]{40}")


def encode_volume(volume: Volume) -> tuple[bytes, dict[str, str]]:
    """The upload body and headers of ``volume`` (fast zlib compression)."""
    body, headers = _encode(volume.voxels, volume.geometry, 1)
    return body, {**headers, NAME_HEADER: urllib.parse.quote(volume.name[:200])}


def encode_field(displacement_lps_mm: np.ndarray, geometry: Geometry) -> tuple[bytes, dict[str, str]]:
    """The upload body and headers of a displacement field ``[k, j, i, 3]`` (LPS mm) on ``geometry``."""
    return _encode(displacement_lps_mm, geometry, 3)


def field_hash(displacement_lps_mm: np.ndarray, geometry: Geometry) -> str:
    """SHA-1 of a field's float32 vectors and its geometry: the name it is uploaded under."""
    digest = hashlib.sha1(np.ascontiguousarray(displacement_lps_mm, dtype="<f4").tobytes())
    digest.update(repr(geometry).encode())
    return digest.hexdigest()


def _encode(values: np.ndarray, geometry: Geometry, components: int) -> tuple[bytes, dict[str, str]]:
    header = {
        "shape_ijk": list(geometry.shape_ijk),
        "spacing_mm": list(geometry.spacing_mm),
        "origin_lps_mm": list(geometry.origin_lps_mm),
        "direction": list(geometry.direction),
        "components": components,
    }
    body = zlib.compress(np.ascontiguousarray(values, dtype="<f4").tobytes(), 1)
    return body, {GEOMETRY_HEADER: json.dumps(header), "Content-Type": VOLUME_MEDIA_TYPE}


def decode_volume(body: bytes, geometry_text: str | None, name_text: str | None, max_bytes: int,
                  limit_name: str = "the server's limit", limit_note: str = "") -> Volume:
    """The volume of an upload; refuses a bad geometry (as a file's: :func:`~MedDIFTLib.core.io.check_geometry`),
    a voxel count over ``max_bytes`` (float32; ``limit_name`` says whose limit that is, ``limit_note`` what
    to do about it), data that do
    not decompress to exactly the declared grid, and NaN or infinite voxels."""
    voxels, geometry = _decode(body, geometry_text, 1, max_bytes, "volume", limit_name, limit_note)
    return Volume(voxels, geometry, urllib.parse.unquote(name_text or "")[:200])


def decode_field(body: bytes, geometry_text: str | None, max_bytes: int) -> tuple[np.ndarray, Geometry]:
    """The displacement ``[k, j, i, 3]`` (float32, LPS mm) and grid of a field upload, refused as
    :func:`decode_volume` refuses a volume."""
    return _decode(body, geometry_text, 3, max_bytes, "field", "the server's limit", "")


def _decode(body: bytes, geometry_text: str | None, components: int, max_bytes: int, what: str,
            limit_name: str, limit_note: str) -> tuple[np.ndarray, Geometry]:
    try:
        header: Any = json.loads(geometry_text or "")
        shape = [operator.index(n) for n in header["shape_ijk"]]
        spacing, origin, direction = header["spacing_mm"], header["origin_lps_mm"], header["direction"]
        check_geometry(spacing, origin, direction, f"the uploaded {what}")
    except (ValueError, TypeError, KeyError):
        raise BadRequestError(f"the upload's {GEOMETRY_HEADER} header must hold shape_ijk (3 whole numbers), "
                              "spacing_mm, origin_lps_mm and direction") from None
    except BadInputError as error:
        raise BadRequestError(str(error)) from None
    if header.get("components", 1) != components:
        raise BadRequestError(f"an uploaded {what} has {components} component(s) per voxel, the upload declares "
                              f"{str(header.get('components'))[:20]}")
    if len(shape) != 3 or min(shape) < 2:
        raise BadRequestError(f"an uploaded {what} must be 3D with at least 2 voxels per axis, got {shape}")
    expected = 4 * components * math.prod(shape)
    if expected > max_bytes:
        raise BadRequestError(f"the uploaded {what} ({describe_bytes(expected, max_bytes)} of voxels) exceeds "
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
    voxels = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(*shape[::-1], components)
    if not np.isfinite(voxels).all():
        raise BadRequestError(f"the uploaded {what} holds NaN or infinite voxels")
    return (voxels[..., 0] if components == 1 else voxels), geometry
