"""The batch manifest: one CSV row per pair (or series), paths relative to the manifest.

Columns (header names, case-insensitive): ``fixed`` and ``moving`` (volumes; required; for
``track`` a ``moving`` cell may list several follow-ups separated by ``;``, in time order: the row is
then a series, :func:`MedDIFTLib.lesions.series.track_series`);
``points`` (fixed points to match or carry; ``fixed_points`` is read the same, so a manifest of
``meddift simulate --manifest`` runs as it is); ``moving_points`` (ground truth in the moving
volume, same labels and order: gives TRE); ``mask`` or ``fixed_mask`` (fixed-image mask for
``register``); ``lesions`` (baseline labelmap for ``track``); ``id`` or ``case`` (the row's output
folder name; default ``row<N>``). A row whose files are missing is reported when it runs, so one bad
row never stops the others; a manifest that cannot be read at all is refused before any work.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BadInputError

COLUMNS = {
    "fixed": ("fixed",),
    "moving": ("moving",),
    "points": ("points", "fixed_points"),
    "moving_points": ("moving_points",),
    "mask": ("mask", "fixed_mask"),
    "lesions": ("lesions",),
    "id": ("id", "case"),
}
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SERIES_SEPARATOR = ";"


@dataclass(frozen=True)
class Row:
    """One pair of the manifest, or a series (``later_moving``: the follow-ups after ``moving``, in
    time order); paths are absolute (or None when the column is absent or empty)."""

    id: str
    line: int
    fixed: str
    moving: str
    points: str | None = None
    moving_points: str | None = None
    mask: str | None = None
    lesions: str | None = None
    later_moving: tuple[str, ...] = ()

    @property
    def followups(self) -> tuple[str, ...]:
        """Every moving volume in time order: ``moving``, then ``later_moving``."""
        return (self.moving, *self.later_moving)

    @property
    def moving_cell(self) -> str:
        """The moving volumes as one cell (the summary's ``moving``): joined by ``;``."""
        return SERIES_SEPARATOR.join(self.followups)

    def input_paths(self) -> dict[str, str]:
        """The row's input files by column, those given only; a series' later follow-ups as ``moving_2``, ..."""
        names = ("fixed", "moving", "points", "moving_points", "mask", "lesions")
        paths = {name: getattr(self, name) for name in names if getattr(self, name)}
        return {**paths, **{f"moving_{k}": path for k, path in enumerate(self.later_moving, start=2)}}


def _column(header: list[str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in header), None)


def read_manifest(path: str | Path) -> list[Row]:
    """The rows of ``path``; an unreadable file, a missing ``fixed``/``moving`` column, an empty
    cell in them, a bad or repeated id is a :class:`BadInputError` naming the line."""
    manifest = Path(path)
    if not manifest.is_file():
        raise BadInputError(f"{manifest}: no such manifest file")
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = [(name or "").strip().lower() for name in reader.fieldnames or []]
            records = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadInputError(f"{manifest}: not a readable CSV manifest ({error})") from None
    columns = {field: _column(header, names) for field, names in COLUMNS.items()}
    missing = [field for field in ("fixed", "moving") if columns[field] is None]
    if missing:
        raise BadInputError(f"{manifest}: the manifest lacks column(s) {', '.join(missing)}; it needs fixed,moving "
                            "(optional: points, moving_points, mask, lesions, id)")
    if not records:
        raise BadInputError(f"{manifest}: the manifest has no rows")
    base = manifest.resolve().parent
    rows, seen = [], set()
    for number, record in enumerate(records, start=2):
        values = {field: record.get(column) or None if column else None for field, column in columns.items()}
        empty = [field for field in ("fixed", "moving") if not values[field]]
        if empty:
            raise BadInputError(f"{manifest}: line {number} has no {' and no '.join(empty)}")
        row_id = values.pop("id") or f"row{number - 1}"
        if not ID_PATTERN.match(row_id):
            raise BadInputError(f"{manifest}: line {number}: id {row_id!r} must start with a letter or a digit, then "
                                "letters, digits, '.', '_' or '-' (it names the row's output folder)")
        if row_id in seen:
            raise BadInputError(f"{manifest}: line {number}: id {row_id!r} is used twice")
        seen.add(row_id)
        followups = [part.strip() for part in values.pop("moving").split(SERIES_SEPARATOR)]
        if not all(followups):
            raise BadInputError(f"{manifest}: line {number}: an empty follow-up in its moving cell (several are "
                                f"separated by '{SERIES_SEPARATOR}')")
        paths = {field: str(base / value) if value else None for field, value in values.items()}
        rows.append(Row(id=row_id, line=number, moving=str(base / followups[0]),
                        later_moving=tuple(str(base / path) for path in followups[1:]), **paths))
    return rows


def check_inputs_outside(rows: list[Row], out: str | Path) -> None:
    """Refuse, before any work, a row input inside a row's output folder ``out/<id>`` (a rerun replaces
    that folder whole) or inside ``out/.staging``."""
    owned = {Path(os.path.realpath(Path(out) / name)) for name in [row.id for row in rows] + [".staging"]}
    for row in rows:
        for column, path in row.input_paths().items():
            resolved = Path(os.path.realpath(path))
            folder = next((folder for folder in owned if folder == resolved or folder in resolved.parents), None)
            if folder is not None:
                raise BadInputError(f"row {row.id}: its {column} {path} lies in the output folder {folder}, which the "
                                    "batch replaces; move the input or choose another --out")
