"""Checking weight files: digests, published checksums, key layout; a cheap fingerprint for cache keys."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import MedDIFTError
from ..core.progress import ProgressFn, no_progress
from .checkpoints import describe_checkpoint
from .registry import WeightFile, find_weight_file, registry_entry, resolve_weights_dir

CHUNK_BYTES = 1 << 20


def file_digests(path: str | os.PathLike, progress: ProgressFn = no_progress) -> dict[str, str]:
    """``{"md5": ..., "sha256": ...}`` hex digests of a file, read once in 1 MiB chunks."""
    source = Path(path)
    total = max(source.stat().st_size, 1)
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    done = 0
    with source.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            md5.update(chunk)
            sha256.update(chunk)
            done += len(chunk)
            progress("checksum", done / total, source.name)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def quick_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a large file: SHA-1 of its size, first and last MiB (a feature-cache key, not a checksum)."""
    source = Path(path)
    size = source.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with source.open("rb") as handle:
        digest.update(handle.read(CHUNK_BYTES))
        handle.seek(max(size - CHUNK_BYTES, 0))
        digest.update(handle.read(CHUNK_BYTES))
    return digest.hexdigest()


@dataclass(frozen=True)
class Verification:
    """Result of checking one file: ``status`` is ``ok``, ``unverified``, ``mismatch`` or ``missing``."""

    name: str
    status: str
    path: Path | None
    message: str
    digests: dict[str, str] = field(default_factory=dict)


def check_digests(entry: WeightFile, digests: dict[str, str]) -> tuple[str, str]:
    """Compare digests with the published checksums of ``entry``: ``(status, message)``.

    ``ok``: matches a published checksum. ``mismatch``: every source publishes one and none matches.
    ``unverified``: no match, but some source publishes no checksum (its copy may differ), or none does.
    """
    published = [(source, kind) for source in entry.sources for kind in ("md5", "sha256") if getattr(source, kind)]
    for source, kind in published:
        if digests.get(kind) == getattr(source, kind):
            return "ok", f"{kind} matches the file published at {source.url}"
    described = f"md5 {digests.get('md5')}, sha256 {digests.get('sha256')}"
    if not published:
        return "unverified", f"no checksum is published for {entry.name}; {described}"
    unchecked = [source for source in entry.sources if not (source.md5 or source.sha256)]
    if not unchecked:
        return "mismatch", f"{described} matches no published checksum of {entry.name}"
    return "unverified", (
        f"{described} differs from the checksum published for {published[0][0].url}; "
        f"{unchecked[0].url} publishes none, so this copy cannot be verified"
    )


def verify_file(
    name: str, weights_dir: str | os.PathLike | None = None, progress: ProgressFn = no_progress
) -> Verification:
    """Checksum and key-layout check of a registered file in the weights folder."""
    entry = registry_entry(name)
    path = find_weight_file(entry.all_names, weights_dir)
    if path is None:
        return Verification(entry.name, "missing", None, f"not found in {resolve_weights_dir(weights_dir)}")
    digests = file_digests(path, progress)
    status, message = check_digests(entry, digests)
    if status != "mismatch":
        try:
            describe_checkpoint(path, entry.role)
        except MedDIFTError as error:
            return Verification(entry.name, "mismatch", path, str(error), digests)
    return Verification(entry.name, status, path, message, digests)
