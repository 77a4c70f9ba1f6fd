"""Helpers shared by the subcommands: progress bars, output checks, and command-line flags that
take their defaults and help from the option classes of :mod:`MedDIFTLib.core.options`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from ..core.errors import BadInputError
from ..core.options import FieldLevel, FieldOptions, RunSettings, describe, parse_assignments, parse_options

POINT_EXTENSIONS = (".mrk.json", ".json", ".fcsv", ".csv")
MATCH_COLUMNS = "label,l,p,s,confidence,similarity,forward_backward_mm,reliable,description"


class ProgressBar:
    """A tqdm bar on stderr that implements the progress callback ``(stage, fraction, message)``.

    It shows only on a terminal, so logs and pipes stay clean.
    """

    def __init__(self, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=100, file=sys.stderr, disable=None if enabled else True, leave=False,
                         bar_format="{desc:<28}{percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        self._stage = ""

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if stage != self._stage:
            self._stage = stage
            self._bar.set_description_str(stage)
        self._bar.n = round(100 * min(max(fraction, 0.0), 1.0), 1)
        self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_input_points(path: str, geometry: Any):
    """The point file at ``path`` (LPS mm; ``geometry`` places voxel formats), at most
    :data:`~MedDIFTLib.core.budget.MAX_POINTS` points as on a server; what the reader skipped
    (e.g. an unplaced markup) is told on stderr as ``meddift: note: ...``."""
    from ..core.budget import MAX_POINTS
    from ..core.io import read_points

    points = read_points(path, geometry)
    if len(points) > MAX_POINTS:
        raise BadInputError(f"{path}: {len(points)} points exceed the limit of {MAX_POINTS} per job; "
                            "split them into several files")
    for note in points.notes:
        print(f"meddift: note: {path}: {note}", file=sys.stderr)
    return points


FIELD_FLAGS = {"spacing_mm": "--grid-spacing-mm", "search_radius_mm": "--search-radius-mm"}
"""The flags of register and track that set a field level's lattice, for memory advice."""


def check_memory_here(estimate: Any) -> None:
    """Refuse, before any work, a job whose :class:`~MedDIFTLib.core.budget.MemoryEstimate` exceeds
    this machine's memory budget."""
    from ..core.budget import check_memory, default_budget

    check_memory(estimate, default_budget())


def check_point_output(path: str) -> Path:
    """Refuse, before any work, an output point file that cannot be written or has an unknown extension."""
    from ..core.io import check_output_path

    return check_output_path(path, POINT_EXTENSIONS)


def _dest(owner: type, name: str, flag: str) -> str:
    """Where :func:`add_option` stores a flag: the class, the field and the flag, for :func:`given_options`."""
    return f"{owner.__name__}:{name}:{flag}"


def add_option(
    parser: argparse.ArgumentParser, owner: type, name: str, flag: str | None = None, *, help: str | None = None,
) -> None:
    """Add ``--flag`` for field ``name`` of option class ``owner``; default and help come from the class.

    The parsed value stays None unless the flag is given, so the class default is the only default.
    A boolean field becomes a switch that sets the opposite of its default.
    """
    field = {f.name: f for f in dataclasses.fields(owner)}[name]
    kind = typing.get_type_hints(owner)[name]
    flag = flag or "--" + name.replace("_", "-")
    text = help if help is not None else describe(owner, name)
    if kind is bool:
        parser.add_argument(flag, dest=_dest(owner, name, flag), action="store_const", const=not field.default,
                            default=None, help=text)
        return
    parser.add_argument(flag, dest=_dest(owner, name, flag), type=kind if kind in (int, float, str) else float,
                        choices=field.metadata.get("choices"), default=None, help=text,
                        metavar=None if field.metadata.get("choices") else flag.lstrip("-").replace("-", "_").upper())


def given_options(args: argparse.Namespace, owner: type) -> dict[str, Any]:
    """The ``owner`` fields given on the command line (by :func:`add_option`), each checked alone so
    that an error names the flag as well as the option."""
    values = {}
    for dest, value in vars(args).items():
        owner_name, _, rest = dest.partition(":")
        if owner_name != owner.__name__ or value is None:
            continue
        name, _, flag = rest.partition(":")
        try:
            parse_options(owner, {name: value})
        except BadInputError as error:
            raise BadInputError(f"{flag}: {error}") from None
        values[name] = value
    return values


def options_from_args(args: argparse.Namespace, owner: type, **fixed: Any) -> Any:
    """An ``owner`` instance from the flags given (class defaults for the rest) and ``fixed`` values."""
    return parse_options(owner, {**given_options(args, owner), **fixed})


def add_field_level_options(
    parser: argparse.ArgumentParser, radius_flag: str = "--search-radius-mm", smoothness: bool = True
) -> None:
    """The flags over the field's levels (:meth:`FieldOptions.with_level_knobs`): the largest motion
    searched for, the finest lattice and (``smoothness``) its smoothing length."""
    first, last = FieldOptions().levels[0], FieldOptions().levels[-1]
    add_option(parser, FieldLevel, "search_radius_mm", radius_flag,
               help=f"largest motion searched for, mm (the first level's radius; default {first.search_radius_mm:g})")
    add_option(parser, FieldLevel, "spacing_mm", "--grid-spacing-mm",
               help=f"finest lattice of searched points, mm (the last level's; default {last.spacing_mm:g})")
    if smoothness:
        add_option(parser, FieldLevel, "smoothness_mm",
                   help=f"smoothing length of the finest level's fit, mm (default {last.smoothness_mm:g})")


def field_options_from_args(args: argparse.Namespace) -> FieldOptions:
    """The field options of the command line: :class:`FieldOptions` flags, then the level knobs given."""
    return options_from_args(args, FieldOptions).with_level_knobs(**given_options(args, FieldLevel))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=RunSettings.device, help=describe(RunSettings, "device"))


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and configure the feature backbone and the device."""
    parser.add_argument("--backbone", default=RunSettings.backbone,
                        help=describe(RunSettings, "backbone") + "; a registered backbone, e.g. mind (weight-free "
                        "MIND-SSC) or maisi (MAISI diffusion features: needs weights, see meddift weights)")
    parser.add_argument("--weights-dir", help="folder holding the backbone's pretrained weights "
                        "(ignored by a backbone that needs none)")
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backbone option, VALUE in JSON (e.g. precision=\"bf16\", timestep=20); repeatable")
    add_device_argument(parser)


def featurizer_from_args(args: argparse.Namespace, device: Any):
    """The backbone chosen by :func:`add_backbone_arguments`, built for ``device``."""
    from ..features import create_featurizer

    options = {**parse_assignments(args.backbone_option, "backbone option"), "device": str(device)}
    if args.weights_dir:
        options["weights_dir"] = args.weights_dir
    return create_featurizer(args.backbone, **options)
