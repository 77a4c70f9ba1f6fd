"""Helpers shared by the subcommands: progress bars and output checks."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import BadInputError

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
