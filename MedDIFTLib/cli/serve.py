"""``meddift serve``: the worker over HTTP, for a GPU machine that Slicer (or ``--server``) uses."""

from __future__ import annotations

import argparse

from ..core.options import RunSettings, ServeOptions, describe
from .common import add_option, options_from_args

DEFAULT_PORT = 8765


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the worker over HTTP (e.g. on a GPU machine) for Slicer and --server",
        description="Serve match, register and features over HTTP, the same requests and events as the local "
        "worker. Volumes are uploaded by the client (never read from a server path) and kept in memory per "
        "session; outputs are written under the cache folder and deleted with their session (closed by the "
        "client or idle for --idle-timeout-s). A non-loopback --host needs --token-file; plain HTTP is for "
        "127.0.0.1 or an SSH tunnel, otherwise give --tls-cert and --tls-key.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--token-file", help="file whose first line is the token clients must send")
    parser.add_argument("--tls-cert", help="TLS certificate (PEM); serve HTTPS")
    parser.add_argument("--tls-key", help="TLS private key (PEM) of --tls-cert")
    for name in ("max_upload_mb", "max_sessions", "idle_timeout_s", "requests_per_minute", "cache_mb",
                 "session_memory_mb"):
        add_option(parser, ServeOptions, name)
    parser.add_argument("--cache-dir", help="folder for the sessions' outputs (default: a new temporary folder, "
                        "deleted at exit); nothing is written elsewhere")
    parser.add_argument("--weights-dir", help="folder of the backbones' pretrained weights on this machine "
                        "(default: the weights cache, see meddift weights); clients cannot choose another")
    parser.add_argument("--device", default=RunSettings.device,
                        help=describe(RunSettings, "device") + "; auto lets each request choose")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    import signal
    import tempfile
    from pathlib import Path

    from ..core.errors import BadInputError

    try:
        import uvicorn
    except ImportError:
        raise BadInputError("meddift serve needs starlette and uvicorn: pip install 'meddift[serve]'") from None
    from ..worker.http_session import read_token_file
    from ..worker.remote.app import create_app
    from ..worker.remote.config import ServeConfig
    from ..worker.remote.security import check_bind
    from ..worker.state import device_name

    token = read_token_file(args.token_file) if args.token_file else None
    check_bind(args.host, token)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise BadInputError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        _check_tls(args.tls_cert, args.tls_key)
    if not 0 <= args.port <= 65535:
        raise BadInputError(f"--port must be from 0 to 65535, got {args.port}")
    limits = options_from_args(args, ServeOptions)
    device = device_name(args.device) if args.device != "auto" else "auto"
    label = _device_label(device_name(args.device))
    own_folder = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="meddift-serve-") if own_folder else args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(cache_dir=cache_dir, options=limits, token=token, device=device, device_label=label,
                         weights_dir=Path(args.weights_dir) if args.weights_dir else None)
    scheme = "https" if args.tls_cert else "http"
    print(f"meddift serve: {scheme}://{args.host}:{args.port} on {label}; "
          f"{'token required' if token else 'no token (loopback only)'}", flush=True)
    # uvicorn shuts down on SIGTERM, then raises the signal again; this handler turns that into a
    # normal exit, so that the cache folder is deleted.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        uvicorn.run(create_app(config), host=args.host, port=args.port, ssl_certfile=args.tls_cert,
                    ssl_keyfile=args.tls_key, log_level="warning", access_log=False)
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if own_folder:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print("meddift serve: stopped", flush=True)
    return 0


class _Stopped(Exception):
    """SIGTERM after the server has shut down."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def _check_tls(cert: str, key: str) -> None:
    """Refuse, before serving, a certificate and key that TLS cannot use together."""
    import os
    import ssl

    from ..core.errors import BadInputError

    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.path.isfile(path):
            raise BadInputError(f"{flag} {path}: no such file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as error:  # an OSError too: caught first
        raise BadInputError(f"--tls-cert {cert} and --tls-key {key} cannot be used together "
                            f"({error.reason or error}): give the certificate and its own private key, PEM") from None
    except OSError as error:
        raise BadInputError(f"--tls-cert {cert}, --tls-key {key}: cannot read ({error.strerror or error})") from None


def _device_label(device: str) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu``: what the client's "Test connection" shows."""
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
