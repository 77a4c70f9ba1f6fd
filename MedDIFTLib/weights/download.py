"""Putting a weight file into the weights folder: download it from a publisher, or import a local copy.

Nothing is downloaded unless :func:`download_file` is called (``meddift weights download``). Both
ways write atomically and check the file (published checksum where there is one, key layout)
before it appears under its canonical name.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..core.errors import BadInputError, MissingWeightsError
from ..core.io.atomic import atomic_output
from ..core.progress import ProgressFn, no_progress
from .checkpoints import describe_checkpoint
from .registry import REGISTRY, WeightFile, WeightSource, is_registered, registry_entry, resolve_weights_dir
from .verify import CHUNK_BYTES, check_digests, file_digests

HF_TOKEN_ENV = "HF_TOKEN"


def url_request(url: str) -> urllib.request.Request:
    """A request for ``url``; ``$HF_TOKEN`` is sent to HuggingFace only."""
    request = urllib.request.Request(url, headers={"User-Agent": "meddift"})
    token = os.environ.get(HF_TOKEN_ENV)
    if token and url.startswith("https://huggingface.co/"):
        request.add_header("Authorization", f"Bearer {token}")
    return request


def choose_source(entry: WeightFile, source: str | None) -> WeightSource:
    """The publisher of ``entry`` labelled (or with the URL) ``source``; default: the first listed."""
    if source is None:
        return entry.sources[0]
    for candidate in entry.sources:
        if source in (candidate.label, candidate.url):
            return candidate
    labels = ", ".join(candidate.label for candidate in entry.sources)
    raise BadInputError(f"{entry.name}: unknown source {source!r}; choose one of: {labels}")


def download_file(
    name: str,
    weights_dir: str | os.PathLike | None = None,
    source: str | None = None,
    progress: ProgressFn = no_progress,
    opener: Callable[..., object] = urllib.request.urlopen,
) -> Path:
    """Download a registered file into the weights folder (atomically) and return its path.

    ``source`` picks a publisher by label (``huggingface``, ``nvidia``) or an exact URL; default:
    the first listed. Progress reports ``("download", fraction, message)``. A download whose
    published checksum or size does not match is removed and reported as :class:`BadInputError`.
    """
    entry = registry_entry(name)
    chosen = choose_source(entry, source)
    target = resolve_weights_dir(weights_dir) / entry.name
    try:
        with atomic_output(target) as tmp:
            _stream(opener, chosen, tmp, entry, progress)
            _check_download(entry, chosen, tmp, file_digests(tmp))
    except urllib.error.HTTPError as error:
        hint = " (the repository may need its licence accepted and HF_TOKEN set)" if error.code in (401, 403) else ""
        raise MissingWeightsError(
            f"download of {entry.name} from {chosen.url} failed: HTTP {error.code}{hint}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MissingWeightsError(f"download of {entry.name} from {chosen.url} failed: {reason}") from None
    return target


def _stream(opener, chosen: WeightSource, tmp: Path, entry: WeightFile, progress: ProgressFn) -> None:
    with opener(url_request(chosen.url)) as response, tmp.open("wb") as handle:
        length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
        total = int(length) if length else entry.size_bytes
        done = 0
        while chunk := response.read(CHUNK_BYTES):
            handle.write(chunk)
            done += len(chunk)
            fraction = min(done / total, 1.0) if total else 0.0
            progress("download", fraction, f"{entry.name}: {done / 2**20:.1f} MiB")


def _check_download(entry: WeightFile, chosen: WeightSource, tmp: Path, digests: dict[str, str]) -> None:
    size = tmp.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        raise BadInputError(f"download of {entry.name} has {size} bytes, expected {entry.size_bytes}; nothing kept")
    for kind in ("sha256", "md5"):
        expected = getattr(chosen, kind)
        if expected and digests[kind] != expected:
            raise BadInputError(
                f"download of {entry.name} from {chosen.url}: {kind} {digests[kind]} != published {expected}; "
                "nothing kept"
            )
    describe_checkpoint(tmp, entry.role)


def import_file(
    path: str | os.PathLike,
    weights_dir: str | os.PathLike | None = None,
    name: str | None = None,
    progress: ProgressFn = no_progress,
) -> Path:
    """Copy a checkpoint the user already has into the weights folder under its canonical name.

    The registry entry comes from ``name`` or from the file's own (canonical or former) name.
    The file's layout is checked first, and a published checksum it fails is an error.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise BadInputError(f"{source}: no such file")
    if name is None and not is_registered(source.name):
        known = ", ".join(n for entry in REGISTRY.values() for n in entry.all_names)
        raise BadInputError(f"{source.name}: cannot tell which weight file this is; pass --as NAME (one of: {known})")
    entry = registry_entry(name or source.name)
    describe_checkpoint(source, entry.role)
    status, message = check_digests(entry, file_digests(source, progress))
    if status == "mismatch":
        raise BadInputError(f"{source}: {message}")
    target = resolve_weights_dir(weights_dir) / entry.name
    if target.exists() and target.resolve() == source.resolve():
        return target
    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)
    return target
