"""The ``meddift`` command line: one module per subcommand in this package.

Each subcommand module exposes ``add_parser(subparsers)``, which registers its parser and sets
``run`` (a function ``args -> exit code``) as a default. Modules import heavy libraries (torch,
monai) inside ``run`` only, so ``meddift --help`` stays fast. A :class:`MedDIFTError` ends the
command with a one-line message on stderr and exit code 2; a closed output pipe (``meddift ... | head``)
ends it quietly with exit code 141, as a shell tool's ``SIGPIPE``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..core.errors import MedDIFTError

SUBCOMMANDS = ("batch", "demo", "eval", "match", "register", "serve", "simulate", "track", "weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddift", description="Training-free 3D correspondence between CT volumes (LPS mm)."
    )
    parser.add_argument("--version", action="version", version=f"meddift {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.run(args) or 0)
    except MedDIFTError as error:
        print(f"meddift: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meddift: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush into a closed pipe is quiet."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
