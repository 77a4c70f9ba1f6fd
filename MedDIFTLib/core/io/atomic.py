"""Safe outputs: check a path before any work, write through a temporary file, rename on success.

A failed or killed job never leaves a partial output, and an existing file is only replaced when
the new one is complete. Files get the mode the user's umask gives (or keep an existing file's
mode), not the private mode of a temporary file. An output path that is a symbolic link is written
through: its target gets the new file and the link stays. No output may be one of the job's
inputs, under any name (:func:`check_outputs_apart`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..errors import BadInputError


def _full_suffix(path: Path) -> str:
    """``.nii.gz`` for ``a.nii.gz``: writers choose their format by the whole suffix."""
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open(path, "w")`` would give."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def check_output_path(path: str | os.PathLike, extensions: tuple[str, ...] | None = None) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder, a name under a
    regular file, a folder without write permission, or (with ``extensions``) an unknown ending.
    A symbolic link is checked where it points (:func:`atomic_output` writes through it)."""
    target = Path(path)
    if extensions is not None and not target.name.lower().endswith(extensions):
        raise BadInputError(f"{target}: output must end in {', '.join(extensions)}")
    if target.is_dir():
        raise BadInputError(f"{target}: is a folder, not a file name")
    parent = Path(os.path.realpath(target)).parent if os.path.islink(target) else target.parent
    existing = next((folder for folder in (parent, *parent.parents) if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BadInputError(f"{target}: {existing} is a file, not a folder")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"{target}: cannot write in {existing or parent}")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=existing)
    except OSError as error:
        raise BadInputError(f"{target}: cannot write in {existing} ({error.strerror})") from None
    os.close(handle)
    os.unlink(probe)
    return target


def _file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names once resolved (links followed, ``..`` taken
    after a folder that is not there yet, as writing would create it); None when nothing is there."""
    try:
        status = os.stat(os.path.realpath(path))
    except OSError:
        return None
    return status.st_dev, status.st_ino


def check_outputs_apart(outputs: Mapping[str, str | os.PathLike | None],
                        inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, an output that is the same file as an input or as another output,
    whatever the names: equal paths, ``..`` and symbolic links resolved, hard links included.
    Keys are what the user calls each path (e.g. ``--out-transform``, ``FIXED``)."""
    inputs_found = {name: _file_identity(path) for name, path in inputs.items() if path is not None}
    seen: dict[str, str] = {}
    for name, path in outputs.items():
        if path is None:
            continue
        identity = _file_identity(path)
        same = next((input_name for input_name, found in inputs_found.items() if found and found == identity), None)
        if same is not None:
            raise BadInputError(f"{name} {path} is the input {same}: writing it would overwrite that input; "
                                "choose another output path")
        resolved = os.path.realpath(path)
        if resolved in seen:
            raise BadInputError(f"{name} and {seen[resolved]} name the same file {path}; give each output its own path")
        seen[resolved] = name


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the extension so format-by-extension writers work. On any
    exception the temporary file is removed and ``path`` is left as it was. A symbolic link
    at ``path`` is written through: the file it points to is replaced, the link is kept.
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".part{_full_suffix(target)}", dir=target.parent
        )
    except OSError as error:
        raise BadInputError(f"{target}: cannot write there ({error.strerror})") from None
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else default_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
