"""Regenerate the README's generated parts: the command synopsis (from the CLI's own parsers), the
options (from MedDIFTLib.core.options) and the benchmark tables (from the results files the
benchmarks write). Never type these by hand.

    python scripts/readme_tables.py          # rewrite README.md in place
    python scripts/readme_tables.py --check  # exit 1 if README.md is out of date (used by a test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

os.environ["COLUMNS"] = "110"  # argparse wraps usage lines to the terminal: fix the width
from MedDIFTLib import cli  # noqa: E402
from MedDIFTLib.core import options  # noqa: E402


def synopsis() -> str:
    """``meddift COMMAND`` usage lines, as ``meddift COMMAND --help`` prints them."""
    parser = cli.build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    usages = [subparser.format_usage().removeprefix("usage: ").rstrip() for subparser in subparsers.choices.values()]
    return "```text\n" + "\n".join(usages) + "\n```"


def option_classes() -> list[type]:
    """Every option class of MedDIFTLib.core.options, in the order of its ``__all__``; one it leaves
    out is refused, so none can be missing from the table."""
    def is_option_class(value: object) -> bool:
        return isinstance(value, type) and issubclass(value, options.Options) and value is not options.Options

    listed = [getattr(options, name) for name in options.__all__ if is_option_class(getattr(options, name))]
    unlisted = {value.__name__ for value in vars(options).values() if is_option_class(value)} - {
        cls.__name__ for cls in listed}
    if unlisted:
        raise SystemExit(f"add to MedDIFTLib.core.options.__all__: {', '.join(sorted(unlisted))}")
    return listed


def default_text(cls: type, field: dataclasses.Field) -> str:
    """The default of ``field`` as the table shows it: the field levels spelled out, a nested option
    class by name (its own rows hold its knobs)."""
    if field.name == "levels" and cls is options.FieldOptions:
        levels = options.FieldOptions().levels
        return f"{len(levels)} level(s): " + "; ".join(
            ", ".join(f"{f.name} {getattr(level, f.name)}" for f in dataclasses.fields(options.FieldLevel))
            for level in levels
        )
    if field.default is not dataclasses.MISSING:
        return str(field.default)
    value = field.default_factory()
    return f"{type(value).__name__} defaults" if isinstance(value, options.Options) else str(value)


def options_table() -> str:
    rows = ["| options | knob | default | meaning |", "|---|---|---|---|"]
    for cls in option_classes():
        for field in dataclasses.fields(cls):
            rows.append(f"| {cls.__name__} | `{field.name}` | {default_text(cls, field)} | "
                        f"{field.metadata.get('help', '')} |")
    return "\n".join(rows)


def results_table(name: str) -> str | None:
    """The Markdown table a benchmark stored in benchmarks/results/<name>.json (key ``markdown``)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["markdown"].strip()


def generated_sections() -> dict[str, str]:
    sections = {"synopsis": synopsis(), "options": options_table()}
    for path in sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []:
        table = results_table(path.stem)
        if table is not None:
            sections[f"results:{path.stem}"] = table
    return sections


def render(text: str) -> str:
    for name, table in generated_sections().items():
        pattern = re.compile(rf"(<!-- {re.escape(name)}:begin -->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
        text = pattern.sub(lambda match, table=table: match.group(1) + table + "\n" + match.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md is out of date: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
