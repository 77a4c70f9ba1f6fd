"""What ``meddift serve`` was started with (:class:`ServeConfig`), what it tells a client of itself
(:func:`server_info`) and what it imposes on each request it takes: only the request types a server
runs (:func:`remote_request`), its device and weights folder (:func:`server_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import __version__
from ...core.errors import BadRequestError
from ...core.options import ServeOptions
from ...features.maisi import packaged_configs
from ..protocol.requests import Limits, ProbeRequest, RejectedRequest, Request, parse_request
from .wire import API

REMOTE_TYPES = ("probe", "unload", "features", "match", "register", "overlays", "track", "track_series", "cancel")


def available_devices() -> tuple[str, ...]:
    """The devices of this machine a request may name: cpu, and cuda, cuda:N for each GPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ("cpu", *(("cuda",) if count else ()), *(f"cuda:{index}" for index in range(count)))


MIB = 2**20


@dataclass(frozen=True)
class ServeConfig:
    """What ``meddift serve`` was started with: its limits as ``options`` (MiB and seconds, see
    :class:`~MedDIFTLib.core.options.ServeOptions`; the MiB ones in bytes as :attr:`max_upload_bytes`,
    :attr:`cache_bytes` and :attr:`session_memory_bytes`), its token, device and folders."""

    cache_dir: Path
    options: ServeOptions = ServeOptions()
    token: str | None = None
    device: str = "auto"
    limits: Limits = Limits()
    device_label: str = ""
    weights_dir: Path | None = None
    devices: tuple[str, ...] = field(default_factory=available_devices)
    """The devices a request may name when ``device`` is ``auto`` (besides ``auto``)."""

    @property
    def max_upload_bytes(self) -> int:
        """The largest volume upload, bytes."""
        return _bytes(self.options.max_upload_mb)

    @property
    def cache_bytes(self) -> int:
        """The feature cache of each session, bytes."""
        return _bytes(self.options.cache_mb)

    @property
    def session_memory_bytes(self) -> int:
        """The memory each session may use, bytes."""
        return _bytes(self.options.session_memory_mb)


def _bytes(mib: float) -> int:
    """``mib`` MiB in whole bytes: the one place a limit of ``meddift serve`` turns into bytes."""
    return int(mib * MIB)


def server_info(config: ServeConfig) -> dict[str, Any]:
    """What a client learns of the server (``GET /info`` and a session's opening): version, API,
    device and limits."""
    return {
        "version": __version__,
        "api": API,
        "device": config.device,
        "device_label": config.device_label,
        "limits": {"max_upload_bytes": config.max_upload_bytes, "max_request_bytes": config.limits.max_request_bytes,
                   "max_points": config.limits.max_points, "max_sessions": config.options.max_sessions,
                   "session_memory_bytes": config.session_memory_bytes,
                   "idle_timeout_s": config.options.idle_timeout_s,
                   "requests_per_minute": config.options.requests_per_minute},
    }


def remote_request(request_id: str, request_type: str, fields: dict[str, Any], limits: Limits) -> Request:
    """The typed request of one posted line (:func:`~..protocol.requests.parse_request`); a type a
    server does not run (a path-style ``load``, ``shutdown``) raises :class:`RejectedRequest`."""
    if request_type not in REMOTE_TYPES:
        raise RejectedRequest(_not_remote(request_type), request_id)
    return parse_request(request_type, fields, limits)


def server_options(request: Request, config: ServeConfig) -> Request:
    """``request`` with the server's device and weights folder; refuses backbone options that would
    make the server read a file it was not started with (a weights folder, a configuration file) and
    a device the server lacks."""
    if isinstance(request, ProbeRequest):
        for options in request.backbone_options.values():
            _check_backbone_options(options)
        return request
    settings = getattr(request, "settings", None)
    if settings is None:
        return request
    _check_backbone_options(settings.backbone_options)
    if config.device == "auto" and settings.device not in ("auto", *config.devices):
        shown = repr(settings.device)[:40]
        raise BadRequestError(f"'device' {shown} is not a device of this server; ask for one of "
                              f"{', '.join(('auto', *config.devices))}")
    if config.weights_dir is not None:
        settings = dataclasses.replace(settings, backbone_options={**settings.backbone_options,
                                                                   "weights_dir": str(config.weights_dir)})
    if config.device != "auto":
        settings = dataclasses.replace(settings, device=config.device)
    return dataclasses.replace(request, settings=settings)


def _check_backbone_options(options: dict[str, Any]) -> None:
    """Refuses a weights folder and a configuration file in one backbone's options."""
    for name, value in options.items():
        option = str(name).rsplit(".", 1)[-1]
        if option == "weights_dir":
            raise BadRequestError("'weights_dir' is chosen by the server (meddift serve --weights-dir)")
        if option == "config" and not (isinstance(value, dict) or value in packaged_configs()):
            raise BadRequestError(f"'{name}' on a server must be a configuration dict or one of "
                                  f"{', '.join(packaged_configs())}")


def _not_remote(request_type: str) -> str:
    if request_type == "load":
        return "the server never reads its own files: upload the volume (RemoteWorkerClient's load does)"
    return f"'{request_type}' is not available on a server; close the session instead"
