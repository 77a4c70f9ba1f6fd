"""``meddift eval DATASET --methods ... --out DIR``: TRE of several methods on a benchmark, in mm.

Every (case, method) runs in its own fresh Python process (:mod:`MedDIFTLib.evaluation.runner`),
started by a task on the Dask engine that ``meddift batch`` uses (a local cluster of ``--workers``
processes, one by default, or ``--scheduler``; there the output and temporary folders must be
shared), so a crash, an out-of-memory kill or a timeout loses that run only and the time and peak
memory are the run's own; ``--in-process`` runs everything in this process instead (for debugging).

Outputs in ``--out``: ``results.json``, ``results.csv``, ``results.md`` (rewritten after every run,
so an interrupted evaluation keeps what was done and says that it was interrupted),
``points/<case>/<method>.csv`` (per point: fixed, true and predicted position in LPS mm, initial
distance, error and the method's confidence), ``logs/`` (each run's output) and ``plots/``. A folder
that already holds results is refused unless ``--resume`` (keep the successful runs of the same
dataset, run the rest) or ``--overwrite`` (replace the results) is given.

This module only parses the arguments and prints; the campaign (checks, resume, Dask submission,
the ``results.json`` schema, plots) is :mod:`MedDIFTLib.evaluation.campaign`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..core.options import DATASET_LAYOUTS
from ..evaluation.campaign import CampaignSettings
from .common import add_device_argument

LAYOUT_CHOICES = ("auto", *DATASET_LAYOUTS)
DEFAULTS = {field.name: field.default for field in dataclasses.fields(CampaignSettings)}
"""The defaults of ``meddift eval``'s flags: those of :class:`CampaignSettings`."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="target registration error (mm) of MedDIFT and baselines on a benchmark or your own pairs",
        description="Evaluate correspondence methods on DATASET: a DIR-Lab 4DCT or COPDgene folder (raw .img + "
        "landmark txt; geometry from the published per-case tables), a Learn2Reg folder (dataset.json, imagesTr, "
        "keypointsTr, masksTr), a CSV manifest (fixed,moving,fixed_points,moving_points; see meddift simulate "
        "--manifest) or a folder of pair folders (each with fixed.nii.gz, moving.nii.gz, fixed_points.csv, "
        "moving_points.csv; any volume or point format). Per case and overall: mean, std, p50, p95 and max TRE "
        "in mm, folding fraction where a field exists, the correlation of a method's confidence with its error, "
        "time and peak memory, as CSV, JSON and Markdown, with plots. Methods: identity; BACKBONE (MedDIFT point "
        "matching with a registered backbone, e.g. mind); BACKBONE-field (MedDIFT's dense field, e.g. "
        "mind-field); bspline; convexadam (when installed). Options as NAME:KEY=VALUE,... with JSON values "
        "(e.g. mind:search_radius_mm=15). One failing case is recorded and the others go on.",
    )
    parser.add_argument("dataset", help="dataset folder, pair folder(s) or CSV manifest")
    methods = list(DEFAULTS["methods"])
    parser.add_argument("--methods", nargs="+", default=methods, metavar="METHOD",
                        help=f"methods to compare (default: {' '.join(methods)})")
    parser.add_argument("--out", required=True, help="output folder (created; new or empty unless --resume or "
                        "--overwrite)")
    parser.add_argument("--resume", action="store_true",
                        help="finish an earlier run in --out: keep its successful runs, run the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default=DEFAULTS["layout"],
                        help="dataset layout (default: detect)")
    parser.add_argument("--split", choices=("val", "train", "test", "all"), default=DEFAULTS["split"],
                        help=f"Learn2Reg pairs to use (default {DEFAULTS['split']})")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (default: all)")
    add_device_argument(parser)
    parser.add_argument("--weights-dir", help="folder holding the pretrained weights of backbones that need them")
    parser.add_argument("--timeout-s", type=float, default=DEFAULTS["timeout_s"],
                        help=f"stop a (case, method) run after this many seconds (default {DEFAULTS['timeout_s']:g})")
    parser.add_argument("--worst", type=int, default=DEFAULTS["worst"],
                        help=f"worst points shown per method (default {DEFAULTS['worst']})")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (no isolation; for debugging)")
    parser.add_argument("--workers", type=int, default=DEFAULTS["workers"],
                        help="runs at once: worker processes of the local Dask cluster, each starting one fresh "
                        f"process per (case, method) (default {DEFAULTS['workers']}, so times and memory are not "
                        "shared)")
    parser.add_argument("--scheduler", default=DEFAULTS["scheduler"],
                        help=f"'{DEFAULTS['scheduler']}' (default) or the address or scheduler file of a Dask "
                        "cluster to run on")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.campaign import describe_record, prepare_campaign
    from ..evaluation.report import markdown_tables
    from .common import ProgressBar

    campaign = prepare_campaign(CampaignSettings(**{name: getattr(args, name) for name in DEFAULTS}))

    def open_client():
        from ..batch import dask_client

        return dask_client(args.scheduler, args.workers)

    def print_record(case: str, method: str, record: dict, done: int, total: int) -> None:
        resumed = " (kept from the earlier run)" if record.get("resumed") else ""
        print(f"[{done}/{total}] {case} / {method}: {describe_record(record)}{resumed}", flush=True)

    with ProgressBar(enabled=not args.quiet) as progress:
        payload = campaign.run(open_client, progress, on_record=None if args.quiet else print_record)
    print(markdown_tables([], payload["overall"]).split("\n\n")[0])
    for note in payload["notes"]:
        print(f"note: {note}")
    failed = [r for r in payload["cases"] if r["status"] == "failed"]
    total = payload["runs_planned"]
    print(f"Wrote results.md, results.csv, results.json, points/ and plots/ to {campaign.out}")
    if failed:
        print(f"{len(failed)} of {total} runs failed; their errors are in {campaign.out / 'results.md'}",
              file=sys.stderr)
        return 1
    return 0
