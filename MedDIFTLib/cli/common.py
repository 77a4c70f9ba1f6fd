"""Helpers shared by the subcommands: progress bars and output checks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..core.errors import BadInputError

POINT_EXTENSIONS = (".mrk.json", ".json", ".fcsv", ".csv")


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


def check_point_output(path: str) -> Path:
    """Reject an output point file with an unknown extension before any work is done."""
    target = Path(path)
    if not target.name.lower().endswith(POINT_EXTENSIONS):
        raise BadInputError(f"{target}: output must end in {', '.join(POINT_EXTENSIONS)}")
    if target.is_dir():
        raise BadInputError(f"{target}: is a folder, not a file name")
    return target


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and configure the feature backbone and the device."""
    parser.add_argument("--backbone", default="mind", help="feature backbone: mind (weight-free) or maisi")
    parser.add_argument("--weights-dir", help="folder holding the backbone's pretrained weights")
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backbone option, VALUE in JSON (e.g. precision=\"bf16\", timestep=20); repeatable")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def parse_backbone_options(pairs: list[str]) -> dict[str, Any]:
    """``["timestep=20", "precision=bf16"]`` -> options; values are JSON, else plain strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise BadInputError(f"backbone option {pair!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def featurizer_from_args(args: argparse.Namespace, device: Any):
    """The backbone chosen by :func:`add_backbone_arguments`, built for ``device``."""
    from ..features import create_featurizer

    options = {**parse_backbone_options(args.backbone_option), "device": str(device)}
    if args.weights_dir:
        options["weights_dir"] = args.weights_dir
    return create_featurizer(args.backbone, **options)
