"""``--server URL [--token-file F]`` of ``meddift match`` and ``register``: the job runs on a
``meddift serve`` machine; volumes are uploaded, results come back and are written here."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.options import FieldOptions, MatchOptions, RunSettings, parse_assignments


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help="run on a meddift serve machine, e.g. http://127.0.0.1:8765 "
                        "(an SSH tunnel) or https://gpu-box:8765; the server's weights and device are used")
    parser.add_argument("--token-file", help="file whose first line is the server's token")
    parser.add_argument("--ca-file", help="certificate (or its CA) to trust for an https server")


def server_client(args: argparse.Namespace):
    """The :class:`~MedDIFTLib.worker.remote_client.RemoteWorkerClient` of ``--server``, not connected
    yet: a bad address, token file or ``--ca-file`` is refused here, before any work."""
    from ..core.errors import BadInputError
    from ..worker.http_session import read_token_file
    from ..worker.remote_client import RemoteWorkerClient

    if args.weights_dir:
        raise BadInputError("--weights-dir names a folder on this computer; with --server the server's weights "
                            "are used (meddift serve --weights-dir)")
    if (args.token_file or args.ca_file) and not args.server:
        raise BadInputError("--token-file and --ca-file go with --server")
    token = read_token_file(args.token_file) if args.token_file else None
    return RemoteWorkerClient(args.server, token=token, ca_file=args.ca_file)


def connect(args: argparse.Namespace):
    """An open session on ``args.server``."""
    client = server_client(args)
    client.start()
    return client


def _settings(args: argparse.Namespace, **part: Any) -> RunSettings:
    """The backbone, its options and the device of ``args``, with the options ``part`` a request carries."""
    return RunSettings(backbone=args.backbone, device=args.device,
                       backbone_options=parse_assignments(args.backbone_option, "backbone option"), **part)


def _load(client, path: str) -> str:
    from ..worker.protocol.requests import LoadRequest

    return client.run(LoadRequest(path)).volume_id


def _volumes(client, args: argparse.Namespace, progress) -> tuple[str, str]:
    progress("upload", 0.0, "fixed volume")
    fixed_id = _load(client, args.fixed)
    progress("upload", 0.5, "moving volume")
    return fixed_id, _load(client, args.moving)


def match_remotely(args: argparse.Namespace, points, options: MatchOptions, progress):
    """The engine's :class:`~MedDIFTLib.matching.Correspondences` of ``points`` (a PointSet), computed
    on the server; and the server's version."""
    from ..worker.protocol.requests import MatchRequest

    with connect(args) as client:
        fixed_id, moving_id = _volumes(client, args, progress)
        request = MatchRequest(fixed_id=fixed_id, moving_id=moving_id, points_lps_mm=points.points_lps_mm,
                               labels=[str(label) for label in points.labels], priors_lps_mm=None,
                               settings=_settings(args, match=options))
        found = client.run(request, progress)
        version = client.version
    return found.correspondences(points.points_lps_mm), version


def register_remotely(args: argparse.Namespace, options: FieldOptions, progress) -> dict[str, Any]:
    """The summary of a registration run on the server, as :func:`MedDIFTLib.field.register_and_write`
    returns it here (its typed result, re-encoded), its outputs written to the local paths."""
    from ..worker.protocol.requests import RegisterRequest
    from ..worker.protocol.results import encode_result

    with connect(args) as client:
        fixed_id, moving_id = _volumes(client, args, progress)
        mask_id = _load(client, args.mask) if args.mask else None
        request = RegisterRequest(fixed_id=fixed_id, moving_id=moving_id, out_transform=args.out_transform,
                                  out_inverse=args.out_inverse, out_warped=args.out_warped, mask_id=mask_id,
                                  settings=_settings(args, field=options))
        return encode_result(client.run(request, progress))
