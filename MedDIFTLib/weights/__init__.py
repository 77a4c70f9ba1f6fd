"""Pretrained weight files: what exists, where it lives on this machine, how to get it.

The registry lists the MAISI checkpoints the ``maisi`` backbone loads, with the places MONAI/NVIDIA
publish them (HuggingFace ``nvidia/NV-Generate-CT`` and the older NVIDIA download URLs), former
file names, and checksums only where a publisher states one (unknown stays ``None``).

Files live in one folder: ``--weights-dir`` / ``weights_dir=``, else ``$MEDDIFT_WEIGHTS_DIR``, else
the user cache (``~/.cache/meddift/weights``, ``%LOCALAPPDATA%\\meddift\\weights`` on Windows).
A folder laid out like an NV-Generate checkout (files under ``models/``) works too.
Nothing is downloaded unless :func:`download` is called (``meddift weights download``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BadInputError, MedDIFTError, MissingWeightsError
from ..core.io.atomic import atomic_output
from ..core.progress import ProgressFn, no_progress
from .checkpoints import describe_checkpoint, fetch_commands

WEIGHTS_DIR_ENV = "MEDDIFT_WEIGHTS_DIR"
HF_TOKEN_ENV = "HF_TOKEN"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WeightSource:
    """One place a file is published; ``md5``/``sha256`` only when that publisher states them."""

    url: str
    label: str
    md5: str | None = None
    sha256: str | None = None
    checksum_reference: str = ""


@dataclass(frozen=True)
class WeightFile:
    """A checkpoint: canonical local ``name``, its ``role`` and the configurations that use it."""

    name: str
    role: str  # "autoencoder" or "diffusion_unet"
    configs: tuple[str, ...]
    sources: tuple[WeightSource, ...]
    former_names: tuple[str, ...] = ()
    size_bytes: int | None = None
    license: str = ""
    description: str = ""
    layout: str = ""

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.former_names)


_HF_CT = "https://huggingface.co/nvidia/NV-Generate-CT/resolve/main/models/"
_NVIDIA = "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/"
_MODEL_ZOO_LIST = "Project-MONAI/model-zoo models/maisi_ct_generative/large_files.yml"
_LICENSE_CT = "NVIDIA Open Model License (see huggingface.co/nvidia/NV-Generate-CT)"

REGISTRY: dict[str, WeightFile] = {
    entry.name: entry
    for entry in (
        WeightFile(
            name="autoencoder_v1.pt",
            role="autoencoder",
            configs=("ddpm-ct", "rflow-ct"),
            former_names=("autoencoder_epoch273.pt",),
            sources=(
                WeightSource(_HF_CT + "autoencoder_v1.pt", "huggingface"),
                WeightSource(
                    _NVIDIA + "model_zoo/model_maisi_autoencoder_epoch273_alternative.pt",
                    "nvidia",
                    md5="917cfb1e49631c8a713e3bb7c758fbca",
                    checksum_reference=_MODEL_ZOO_LIST,
                ),
            ),
            license=_LICENSE_CT,
            description="MAISI CT autoencoder (AutoencoderKlMaisi, latent 4)",
            layout="plain state dict",
        ),
        WeightFile(
            name="diff_unet_3d_ddpm-ct.pt",
            role="diffusion_unet",
            configs=("ddpm-ct",),
            former_names=(
                "diff_unet_3d_ddpm.pt",
                "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
            ),
            sources=(
                WeightSource(_HF_CT + "diff_unet_3d_ddpm-ct.pt", "huggingface"),
                WeightSource(
                    _NVIDIA
                    + "model_zoo/model_maisi_input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1"
                    + "_alternative.pt",
                    "nvidia",
                    md5="623bd02ff223b70d280cc994fcb70a69",
                    checksum_reference=_MODEL_ZOO_LIST,
                ),
            ),
            license=_LICENSE_CT,
            description="MAISI v1 diffusion UNet (DDPM, body-region and spacing inputs)",
            layout="dict with unet_state_dict, scale_factor, num_train_timesteps",
        ),
        WeightFile(
            name="diff_unet_3d_rflow-ct.pt",
            role="diffusion_unet",
            configs=("rflow-ct",),
            former_names=("diff_unet_3d_rflow.pt", "diff_unet_ckpt_rflow_epoch19350.pt"),
            sources=(
                WeightSource(_HF_CT + "diff_unet_3d_rflow-ct.pt", "huggingface"),
                WeightSource(_NVIDIA + "diff_unet_ckpt_rflow_epoch19350.pt", "nvidia"),
            ),
            license=_LICENSE_CT,
            description="MAISI v2 diffusion UNet (rectified flow, modality and spacing inputs)",
            layout="dict with unet_state_dict, scale_factor, num_train_timesteps",
        ),
    )
}


def default_weights_dir() -> Path:
    """``$MEDDIFT_WEIGHTS_DIR`` if set, else the per-user cache folder."""
    configured = os.environ.get(WEIGHTS_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "meddift" / "weights"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "meddift" / "weights"


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder to use: the given one, else :func:`default_weights_dir`."""
    return Path(weights_dir).expanduser() if weights_dir else default_weights_dir()


def registry_entry(name: str) -> WeightFile:
    """The entry for a canonical or former file name; unknown names are rejected."""
    for entry in REGISTRY.values():
        if name in entry.all_names:
            return entry
    raise BadInputError(f"unknown weight file {name!r}; known files: {', '.join(REGISTRY)}")


def files_for_config(config_name: str) -> list[WeightFile]:
    """Registry entries a backbone configuration (e.g. ``ddpm-ct``) needs."""
    entries = [entry for entry in REGISTRY.values() if config_name in entry.configs]
    if not entries:
        known = sorted({name for entry in REGISTRY.values() for name in entry.configs})
        raise BadInputError(f"no registered weights for configuration {config_name!r}; known: {', '.join(known)}")
    return entries


def find_weight_file(file_names: Iterable[str], weights_dir: str | os.PathLike | None = None) -> Path | None:
    """First existing file among ``file_names`` in the folder or its ``models/`` subfolder."""
    folder = resolve_weights_dir(weights_dir)
    for candidate_folder in (folder, folder / "models"):
        for name in file_names:
            path = candidate_folder / name
            if path.is_file():
                return path
    return None


def _is_registered(name: str) -> bool:
    return any(name in entry.all_names for entry in REGISTRY.values())


def missing_weights_error(missing: list[str], weights_dir: Path, config_name: str | None) -> MissingWeightsError:
    names = ", ".join(missing)
    return MissingWeightsError(
        f"MAISI weights not found in {weights_dir}: {names}; {fetch_commands(config_name)} "
        f"(or point --weights-dir / ${WEIGHTS_DIR_ENV} at the folder holding them)"
    )


def file_digests(path: str | os.PathLike, progress: ProgressFn = no_progress) -> dict[str, str]:
    """``{"md5": ..., "sha256": ...}`` hex digests of a file, read once in 1 MiB chunks."""
    source = Path(path)
    total = max(source.stat().st_size, 1)
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    done = 0
    with source.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
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
        digest.update(handle.read(_CHUNK_BYTES))
        handle.seek(max(size - _CHUNK_BYTES, 0))
        digest.update(handle.read(_CHUNK_BYTES))
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


def verify(name: str, weights_dir: str | os.PathLike | None = None, progress: ProgressFn = no_progress) -> Verification:
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


def _open_url(url: str) -> urllib.request.Request:
    request = urllib.request.Request(url, headers={"User-Agent": "meddift"})
    token = os.environ.get(HF_TOKEN_ENV)
    if token and url.startswith("https://huggingface.co/"):
        request.add_header("Authorization", f"Bearer {token}")
    return request


def download(
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
            digests = file_digests(tmp)
            _check_download(entry, chosen, tmp, digests)
    except urllib.error.HTTPError as error:
        hint = " (the repository may need its licence accepted and HF_TOKEN set)" if error.code in (401, 403) else ""
        raise MissingWeightsError(
            f"download of {entry.name} from {chosen.url} failed: HTTP {error.code}{hint}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MissingWeightsError(f"download of {entry.name} from {chosen.url} failed: {reason}") from None
    return target


def choose_source(entry: WeightFile, source: str | None) -> WeightSource:
    if source is None:
        return entry.sources[0]
    for candidate in entry.sources:
        if source in (candidate.label, candidate.url):
            return candidate
    labels = ", ".join(candidate.label for candidate in entry.sources)
    raise BadInputError(f"{entry.name}: unknown source {source!r}; choose one of: {labels}")


def _stream(opener, chosen: WeightSource, tmp: Path, entry: WeightFile, progress: ProgressFn) -> None:
    with opener(_open_url(chosen.url)) as response, tmp.open("wb") as handle:
        length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
        total = int(length) if length else entry.size_bytes
        done = 0
        while chunk := response.read(_CHUNK_BYTES):
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
    if name is None and not _is_registered(source.name):
        known = ", ".join(n for entry in REGISTRY.values() for n in entry.all_names)
        raise BadInputError(f"{source.name}: cannot tell which weight file this is; pass --as NAME (one of: {known})")
    entry = registry_entry(name or source.name)
    describe_checkpoint(source, entry.role)
    digests = file_digests(source, progress)
    status, message = check_digests(entry, digests)
    if status == "mismatch":
        raise BadInputError(f"{source}: {message}")
    target = resolve_weights_dir(weights_dir) / entry.name
    if target.exists() and target.resolve() == source.resolve():
        return target
    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)
    return target
