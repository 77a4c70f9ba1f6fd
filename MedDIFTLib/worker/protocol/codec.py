"""Reading and writing the fields of requests and results, shared by the job families (torch-free).

A request's fields are checked once as they are read (:class:`BadRequestError` naming the field);
a result's fields as a client reads them back (:class:`MalformedResult` naming the type and the
field). A number that is not finite travels as ``null`` and reads back as NaN. Coordinates are LPS mm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.budget import MAX_POINTS
from ...core.errors import BadRequestError
from ...core.options import RunSettings, parse_options
from ..events import WorkerError

MAX_REQUEST_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: bytes of its line and number of points it carries."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    max_points: int = MAX_POINTS


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------- request fields


def text(fields: Mapping[str, Any], name: str, meaning: str, optional: bool = False) -> str | None:
    """``fields[name]``, a non-empty string (None when absent and ``optional``)."""
    value = fields.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"'{name}' must be {meaning}")
    return value


def volume_id(fields: Mapping[str, Any], name: str, optional: bool = False) -> str | None:
    """``fields[name]``, the id of a loaded volume."""
    return text(fields, name, "the volume id returned by a 'load' request", optional)


def points(fields: Mapping[str, Any], name: str, limits: Limits, count: int | None = None) -> np.ndarray | None:
    """``fields[name]`` as an (N, 3) float array of LPS mm (None when absent and ``count`` is given)."""
    raw = fields.get(name)
    if raw is None and count is not None:
        return None
    if not isinstance(raw, list):
        raise BadRequestError(f"'{name}' must be a list of [l, p, s] points in mm")
    if len(raw) > limits.max_points:
        raise BadRequestError(f"'{name}': {len(raw)} points exceed the limit of {limits.max_points} per request")
    try:
        parsed = np.asarray(raw, dtype=float)
    except (TypeError, ValueError):
        raise BadRequestError(f"'{name}' must be a list of [l, p, s] number triples") from None
    if len(raw) == 0:
        parsed = parsed.reshape(0, 3)
    if parsed.ndim != 2 or parsed.shape[1] != 3:
        raise BadRequestError(f"'{name}' must be a list of [l, p, s] number triples")
    if count is not None and len(parsed) != count:
        raise BadRequestError(f"'{name}' has {len(parsed)} points for {count} fixed points")
    return parsed


def run_settings(fields: Mapping[str, Any], what: str, **options: Any) -> RunSettings:
    """Backbone, backbone options (null: none) and device of a job, with its match or field options."""
    run = {name: fields[name] for name in ("backbone", "device") if name in fields}
    if fields.get("backbone_options") is not None:
        run["backbone_options"] = fields["backbone_options"]
    return dataclasses.replace(parse_options(RunSettings, run, f"{what} request"), **options)


def run_fields(settings: RunSettings, request_type: str, carries: str | None = None) -> dict[str, Any]:
    """Backbone, backbone options and device of ``settings`` as fields; its match and field options
    other than ``carries`` must be the defaults the worker will use (ValueError otherwise)."""
    defaults = RunSettings()
    for part in ("match", "field"):
        if part != carries and getattr(settings, part) != getattr(defaults, part):
            raise ValueError(f"a {request_type} request does not carry settings.{part}: leave it at its default")
    return {"backbone": settings.backbone, "backbone_options": dict(settings.backbone_options),
            "device": settings.device}


def point_list(values: np.ndarray | None) -> list[list[float]] | None:
    """Points as a JSON list of [l, p, s] (None stays None)."""
    return None if values is None else np.asarray(values, dtype=float).tolist()


# ---------------------------------------------------------------------- result fields


class MalformedResult(WorkerError):
    """A result payload that does not have the shape of its type (the worker misbehaved)."""


def json_number(value: float) -> float | None:
    """``value`` as JSON holds it: a float, or None when it is not finite."""
    return float(value) if math.isfinite(value) else None


def json_numbers(values: Sequence[float] | np.ndarray) -> list[float | None]:
    """Numbers as a JSON list (non-finite ones as None)."""
    return [json_number(value) for value in np.asarray(values, dtype=float).ravel()]


def json_number_map(values: Mapping[str, float]) -> dict[str, float | None]:
    """A map of numbers as a JSON object (whole numbers stay whole, non-finite ones None)."""
    return {str(name): value if isinstance(value, int) else json_number(value) for name, value in values.items()}


def is_number(value: Any) -> bool:
    """A JSON number or null."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def as_float(value: float | None) -> float:
    """A JSON number or null as a float (null: NaN)."""
    return math.nan if value is None else float(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ResultFields:
    """The fields of one result object; each reader raises :class:`MalformedResult` naming the field."""

    def __init__(self, payload: Any, what: str) -> None:
        if not isinstance(payload, Mapping):
            raise MalformedResult(f"the worker returned a malformed {what}: not a JSON object")
        self.payload = payload
        self.what = what

    def malformed(self, name: str, meaning: str) -> MalformedResult:
        return MalformedResult(f"the worker returned a malformed {self.what}: '{name}' must be {meaning}")

    def get(self, name: str, check: Callable[[Any], bool], meaning: str) -> Any:
        value = self.payload.get(name)
        if not check(value):
            raise self.malformed(name, meaning)
        return value

    def text(self, name: str, optional: bool = False) -> str | None:
        return self.get(name, lambda v: isinstance(v, str) or (optional and v is None),
                        "a string" + (" or null" if optional else ""))

    def texts(self, name: str) -> list[str]:
        """A list of strings."""
        return list(self.get(name, lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
                             "a list of strings"))

    def flag(self, name: str) -> bool:
        return self.get(name, lambda v: isinstance(v, bool), "true or false")

    def whole(self, name: str) -> int:
        return self.get(name, _is_whole, "a whole number")

    def number(self, name: str) -> float:
        """A number; null reads as NaN."""
        return as_float(self.get(name, is_number, "a number or null"))

    def numbers(self, name: str, count: int | None = None) -> np.ndarray:
        """A list of numbers or nulls (NaN), ``count`` of them when given."""
        values = self.get(name, lambda v: isinstance(v, list) and all(map(is_number, v)), "a list of numbers")
        if count is not None and len(values) != count:
            raise MalformedResult(f"the worker returned a malformed {self.what}: '{name}' has {len(values)} "
                                  f"values, not {count}")
        return np.array([as_float(value) for value in values], dtype=float)

    def number_map(self, name: str) -> dict[str, float]:
        """An object of numbers (whole numbers stay whole; null reads as NaN)."""
        values = self.get(name, lambda v: isinstance(v, Mapping) and all(map(is_number, v.values())),
                          "an object of numbers")
        return {str(key): value if _is_whole(value) else as_float(value) for key, value in values.items()}

    def wholes(self, name: str, count: int) -> tuple[int, ...]:
        """A list of ``count`` whole numbers."""
        return tuple(self.get(name, lambda v: isinstance(v, list) and len(v) == count and all(map(_is_whole, v)),
                              f"a list of {count} whole numbers"))

    def object(self, name: str) -> ResultFields:
        """An object, read as its own fields."""
        return ResultFields(self.payload.get(name), f"{self.what} ({name})")

    def objects(self, name: str) -> list[ResultFields]:
        """A list of objects, each read as its own fields."""
        items = self.get(name, lambda v: isinstance(v, list), "a list of objects")
        return [ResultFields(item, f"{self.what} ({name}[{index}])") for index, item in enumerate(items)]
