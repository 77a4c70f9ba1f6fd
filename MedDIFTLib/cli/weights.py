"""``meddift weights``: list, locate, download, verify and import pretrained weight files.

    meddift weights list                      registry and what the weights folder holds
    meddift weights path [NAME]               the weights folder, or one file's path
    meddift weights download [NAME ...]       fetch files (asks first; --yes to skip the question)
    meddift weights verify [NAME ...]         checksums where published, and key layout
    meddift weights import FILE [--as NAME]   copy a file you already have into the folder

The folder is ``--weights-dir``, else ``$MEDDIFT_WEIGHTS_DIR``, else the user cache. Progress goes
to stderr as text, or with ``--progress json`` as the worker's JSON ``progress`` events, one a line
(how the Slicer module follows a transfer it runs in a child process).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import BadInputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list, download, verify or import pretrained weights",
        description="List, locate, download, verify and import pretrained weight files.",
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--weights-dir", type=Path, default=None, help="weights folder (default: the user cache)")
        return sub

    action("list", "show the known weight files and which are present")
    path_parser = action("path", "print the weights folder, or the path of one file")
    path_parser.add_argument("name", nargs="?", help="file name (canonical or former)")
    download_parser = action("download", "download weight files (only when you ask)")
    download_parser.add_argument("names", nargs="*", help="files to fetch (default: those of --config)")
    download_parser.add_argument("--config", default="ddpm-ct", help="backbone configuration whose files to fetch")
    download_parser.add_argument("--source", default=None, help="publisher label (huggingface, nvidia) or a URL")
    download_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    download_parser.add_argument("--force", action="store_true", help="download even if the file is present")
    verify_parser = action("verify", "check present files (published checksums, key layout)")
    verify_parser.add_argument("names", nargs="*", help="files to check (default: all present)")
    import_parser = action("import", "copy a weight file you already have into the weights folder")
    import_parser.add_argument("file", type=Path, help="the checkpoint file")
    import_parser.add_argument("--as", dest="as_name", default=None, help="registry name, if the file name differs")
    for reporting in (download_parser, verify_parser, import_parser):
        reporting.add_argument("--progress", choices=("text", "json"), default="text",
                               help="progress on stderr: text, or the worker's JSON progress events (one a line)")
    parser.set_defaults(run=run)


class _StderrProgress:
    """One line per file on stderr, redrawn in place on a terminal, every 10 % otherwise."""

    def __init__(self) -> None:
        self.interactive = sys.stderr.isatty()
        self.last_decile = -1

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        decile = int(fraction * 10)
        if self.interactive:
            print(f"\r{stage}: {fraction:6.1%} {message}", end="", file=sys.stderr, flush=True)
        elif decile != self.last_decile:
            print(f"{stage}: {fraction:.0%} {message}", file=sys.stderr, flush=True)
        self.last_decile = decile

    def finish(self) -> None:
        if self.interactive:
            print(file=sys.stderr)
        self.last_decile = -1


class _JsonProgress:
    """The worker's ``progress`` events (no request id) on stderr, one a line, at each whole percent."""

    def __init__(self) -> None:
        self.last_percent = -1

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        from ..worker.stream import progress_event

        percent = int(min(max(fraction, 0.0), 1.0) * 100)
        if percent != self.last_percent:
            print(json.dumps(progress_event(None, stage, fraction, message)), file=sys.stderr, flush=True)
        self.last_percent = percent

    def finish(self) -> None:
        self.last_percent = -1


def _progress(args: argparse.Namespace) -> _StderrProgress | _JsonProgress:
    return _JsonProgress() if args.progress == "json" else _StderrProgress()


def run(args: argparse.Namespace) -> int:
    from .. import weights

    folder = weights.resolve_weights_dir(args.weights_dir)
    handlers = {
        "list": _list,
        "path": _path,
        "download": _download,
        "verify": _verify,
        "import": _import,
    }
    return handlers[args.weights_action](args, folder)


def _list(args: argparse.Namespace, folder: Path) -> int:
    from .. import weights

    print(f"weights folder: {folder}")
    for entry in weights.REGISTRY.values():
        path = weights.find_weight_file(entry.all_names, folder)
        state = f"present ({path.stat().st_size / 2**20:.0f} MiB, {path})" if path else "missing"
        print(f"{entry.name}  [{entry.role}; configs: {', '.join(entry.configs)}]  {state}")
        print(f"    {entry.description}; layout: {entry.layout}")
        if entry.former_names:
            print(f"    former names: {', '.join(entry.former_names)}")
        size = f"{entry.size_bytes} bytes" if entry.size_bytes else "size not published"
        print(f"    {size}; licence: {entry.license}")
        for source in entry.sources:
            checksums = [f"{kind} {getattr(source, kind)}" for kind in ("sha256", "md5") if getattr(source, kind)]
            published = f" ({', '.join(checksums)}, per {source.checksum_reference})" if checksums else ""
            print(f"    {source.label}: {source.url}{published}")
    return 0


def _path(args: argparse.Namespace, folder: Path) -> int:
    from .. import weights

    if not args.name:
        print(folder)
        return 0
    entry = weights.registry_entry(args.name)
    path = weights.find_weight_file(entry.all_names, folder)
    if path is None:
        print(f"meddift: {entry.name} is not in {folder}; {weights.fetch_commands()}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise BadInputError("downloading needs your confirmation; run in a terminal or pass --yes")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def _download(args: argparse.Namespace, folder: Path) -> int:
    from .. import weights

    entries = (
        [weights.registry_entry(name) for name in args.names] if args.names else weights.files_for_config(args.config)
    )
    wanted = [entry for entry in entries if args.force or weights.find_weight_file(entry.all_names, folder) is None]
    for entry in entries:
        if entry not in wanted:
            print(f"{entry.name}: already present, skipped (--force downloads it again)")
    if not wanted:
        return 0
    print(f"to download into {folder}:")
    for entry in wanted:
        source = weights.choose_source(entry, args.source)
        size = f"{entry.size_bytes / 2**20:.0f} MiB" if entry.size_bytes else "size not published"
        print(f"  {entry.name} ({size}) from {source.url}\n    licence: {entry.license}")
    if not args.yes and not _confirm("Download these files?"):
        print("nothing downloaded")
        return 1
    progress = _progress(args)
    for entry in wanted:
        path = weights.download_file(entry.name, folder, source=args.source, progress=progress)
        progress.finish()
        print(f"{entry.name}: saved to {path}")
    return 0


def _verify(args: argparse.Namespace, folder: Path) -> int:
    from .. import weights

    names = args.names or [
        entry.name for entry in weights.REGISTRY.values() if weights.find_weight_file(entry.all_names, folder)
    ]
    if not names:
        print(f"no weight files in {folder}; {weights.fetch_commands()}")
        return 1
    failed = False
    progress = _progress(args)
    for name in names:
        result = weights.verify_file(name, folder, progress=progress)
        progress.finish()
        failed = failed or result.status in ("missing", "mismatch")
        where = f" ({result.path})" if result.path else ""
        print(f"{result.name}: {result.status}{where}: {result.message}")
    return 1 if failed else 0


def _import(args: argparse.Namespace, folder: Path) -> int:
    from .. import weights

    progress = _progress(args)
    path = weights.import_file(args.file, folder, name=args.as_name, progress=progress)
    progress.finish()
    print(f"imported {args.file} as {path}")
    return 0
