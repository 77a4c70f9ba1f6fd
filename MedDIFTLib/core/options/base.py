"""The base of every option class and the one parser that builds them (see the package).

:class:`Options` checks ranges when an instance is made; :func:`option` declares a field with its
range and help; :func:`parse_options` builds a class from JSON-like values, naming a bad key;
:func:`to_json` is its inverse. Imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ..errors import BadInputError, BadRequestError

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with its range: ``minimum``/``maximum`` inclusive, ``above`` exclusive.
    ``default_factory`` instead of ``default`` for a mutable or nested default."""
    metadata = {"minimum": minimum, "maximum": maximum, "above": above, "choices": choices, "help": help}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def describe(instance_or_class: Any, name: str) -> str:
    """The help text of option ``name`` with its default, e.g. for ``--help``."""
    cls = instance_or_class if isinstance(instance_or_class, type) else type(instance_or_class)
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f"{field.metadata.get('help', '')} (default {field.default})".strip()


class Options:
    """Base of the option classes: a value out of range is refused when the instance is made."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_range(type(self).__name__, field, getattr(self, field.name))


def _check_range(owner: str, field: dataclasses.Field, value: Any) -> None:
    meta = field.metadata
    if value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            if meta.get("choices") and item not in meta["choices"]:
                raise BadInputError(f"option {field.name!r}: {item!r} is not one of {', '.join(meta['choices'])}")
            continue
        if not math.isfinite(item):
            raise BadInputError(f"option {field.name!r} must be a finite number, got {item}")
        if meta.get("minimum") is not None and item < meta["minimum"]:
            raise BadInputError(f"option {field.name!r} must be >= {meta['minimum']}, got {item}")
        if meta.get("maximum") is not None and item > meta["maximum"]:
            raise BadInputError(f"option {field.name!r} must be <= {meta['maximum']}, got {item}")
        if meta.get("above") is not None and not item > meta["above"]:
            raise BadInputError(f"option {field.name!r} must be > {meta['above']}, got {item}")


def parse_options(cls: type[T], raw: Mapping[str, Any] | None, what: str = "") -> T:
    """Build option class ``cls`` from a JSON-like mapping.

    An unknown key or a wrong type raises :class:`BadRequestError`, a value out of range
    :class:`BadInputError`; both name the key. Lists become tuples; a nested option class comes
    as an object or as a list of its fields in order."""
    what = what or cls.__name__
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise BadRequestError(f"{what} must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BadRequestError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(value, hints[name], f"{what} option {name!r}") for name, value in raw.items()}
    return cls(**values)


def _convert(value: Any, annotation: Any, what: str) -> Any:
    """``value`` from JSON converted to ``annotation`` (a type, union, tuple or option class)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, what)
            except BadRequestError:
                continue
        raise BadRequestError(f"{what}: {value!r} does not fit {_type_name(annotation)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BadRequestError(f"{what}: {value!r} is not a list")
        element_types = typing.get_args(annotation)
        if len(element_types) == 2 and element_types[1] is Ellipsis:
            return tuple(_convert(item, element_types[0], what) for item in value)
        if len(value) != len(element_types):
            raise BadRequestError(f"{what}: needs {len(element_types)} values, got {len(value)}")
        return tuple(_convert(item, kind, what) for item, kind in zip(value, element_types))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise BadRequestError(f"{what}: {value!r} is not an object")
        return dict(value)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, (list, tuple)):
            names = [f.name for f in dataclasses.fields(annotation)]
            if len(value) > len(names):
                raise BadRequestError(f"{what}: {value!r} has more than {len(names)} values ({', '.join(names)})")
            value = dict(zip(names, value))
        return parse_options(annotation, value, what)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Any:
        return value
    raise BadRequestError(f"{what}: {value!r} is not {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    names = {bool: "true or false", float: "a number", int: "a whole number", str: "text"}
    if annotation in names:
        return names[annotation]
    return str(annotation).replace("typing.", "")


def parse_assignments(pairs: Iterable[str], what: str = "option") -> dict[str, Any]:
    """``["timestep=20", "precision=bf16"]`` -> ``{"timestep": 20, "precision": "bf16"}``: each
    VALUE is read as JSON, else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise BadInputError(f"{what} {pair!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


def to_json(instance: Any) -> dict[str, Any]:
    """An option instance as a JSON-ready dict (tuples become lists), the inverse of :func:`parse_options`."""
    return json.loads(json.dumps(dataclasses.asdict(instance)))
