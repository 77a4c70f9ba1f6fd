"""``meddift batch MANIFEST --out DIR``: every pair (or lesion series) of a manifest through match, register or
track, on Dask."""

from __future__ import annotations

import argparse

from ..batch.job import TASKS
from ..core.options import FieldOptions, LesionOptions, MatchOptions, SeriesOptions, describe
from .common import (
    ProgressBar,
    add_backbone_arguments,
    add_field_level_options,
    add_option,
    field_options_from_args,
    options_from_args,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="run match, register or track on every pair of a CSV manifest, on a local or remote Dask cluster",
        description="Run the single-pair command (--task match, register or track) on each row of MANIFEST, a CSV "
        "with columns fixed, moving (required), points (or fixed_points), moving_points (ground truth: gives TRE), "
        "mask (or fixed_mask), lesions (baseline labelmap or points, for track), id (or case: the row's output "
        "folder); paths relative to the manifest. For track, a moving cell may list several follow-ups separated "
        "by ';' (in time order): the row follows its lesions through the series. Each row's outputs, the same "
        "as the single-pair command's (match: matched.csv; register: transform.nii.gz, transform.nii.gz.json, "
        "points.csv; track: followup_lesions.nii.gz, lesions.csv, report.md, lesions.png; a series: "
        "followup_<k>_lesions.nii.gz, lesions.csv, response.csv, report.md, growth.png, lesions.png), appear in "
        "DIR/<id>/ complete or not at all; DIR/summary.csv lists every row with its status, times, peak memory "
        "and TRE. Each volume's features are computed once and shared by the rows that use it. A rerun skips rows "
        "finished with the same inputs and options (content hash) and runs the rest; a failing row is recorded and "
        "the others go on.",
    )
    parser.add_argument("manifest", help="CSV manifest of pairs")
    parser.add_argument("--out", required=True, help="output folder (created; rerun into it to resume)")
    parser.add_argument("--task", choices=TASKS, default="match", help="what to do to each pair (default match; "
                        "track: fixed = baseline, moving = follow-up(s), lesions column)")
    parser.add_argument("--scheduler", default="local", help="'local' (default: a cluster of worker processes "
                        "on this machine) or a Dask scheduler address (tcp://host:8786) or scheduler file")
    parser.add_argument("--workers", type=int, default=1, help="local cluster: worker processes (default 1)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="local cluster: rows run at once per worker (default 1)")
    parser.add_argument("--memory-limit", default="auto",
                        help="local cluster: memory per worker, e.g. 8GB (default auto: this machine's memory "
                        "shared out)")
    parser.add_argument("--share-features-mb", type=float, default=2048.0,
                        help="a volume's features up to this size move between workers; larger ones stay on the "
                        "worker that made them and are recomputed by another worker that needs them (default 2048)")
    add_backbone_arguments(parser)
    add_option(parser, MatchOptions, "search_radius_mm", "--match-search-radius-mm")
    add_option(parser, MatchOptions, "mode")
    add_option(parser, MatchOptions, "confidence_threshold")
    add_field_level_options(parser, "--field-search-radius-mm")
    add_option(parser, FieldOptions, "optimise_iterations")
    add_option(parser, FieldOptions, "optimise_regularisation", "--regularisation")
    add_option(parser, LesionOptions, "refine", "--no-refine",
               help="track: keep the carried labelmap as it is (default: refine it to the follow-up image)")
    add_option(parser, LesionOptions, "growth_margin_mm")
    add_option(parser, LesionOptions, "largest_volume_factor")
    add_option(parser, LesionOptions, "seed_radius_mm")
    add_option(parser, LesionOptions, "centre_search_radius_mm")
    add_option(parser, LesionOptions, "field_margin_mm")
    add_option(parser, LesionOptions, "confidence_threshold", "--lesion-confidence-threshold")
    add_option(parser, SeriesOptions, "route", "--series",
               help="track, rows with several follow-ups: " + describe(SeriesOptions, "route"))
    add_option(parser, SeriesOptions, "agreement_mm")
    add_option(parser, SeriesOptions, "measurable_mm")
    add_option(parser, SeriesOptions, "max_targets")
    parser.add_argument("--inverse", action="store_true", help="register: also write inverse.nii.gz")
    parser.add_argument("--warped", action="store_true", help="register: also write warped.nii.gz")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-row lines")
    parser.set_defaults(run=run)


def _line(record: dict) -> str:
    text = f"{record['id']}: {record['status']}"
    if record["status"] == "failed":
        return f"{text} ({record.get('kind')}): {record.get('error')}"
    if record.get("tre_mean_mm") is not None:
        text += f", TRE mean {record['tre_mean_mm']:.2f} mm"
    if record.get("response") is not None:
        text += f", response at the last follow-up {record['response']}"
    if record["status"] == "done":
        return text + " (kept from an earlier run)"
    return text + f", {record.get('seconds_row', 0.0):.1f} s on {record.get('worker')}"


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..batch import (
        BatchJob,
        FeatureRecipe,
        check_inputs_outside,
        dask_client,
        discard_staging,
        read_manifest,
        run_batch,
    )
    from ..core.errors import BadInputError, MissingWeightsError
    from ..core.io import check_output_path
    from ..core.options import parse_assignments
    from ..features import backbone_spec

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: is a file, not a folder")
    check_output_path(out / "summary.csv")
    if not args.share_features_mb >= 0:
        raise BadInputError("--share-features-mb must be >= 0")
    rows = read_manifest(args.manifest)
    check_inputs_outside(rows, out)
    options = parse_assignments(args.backbone_option, "backbone option")
    if args.weights_dir:
        options["weights_dir"] = str(Path(args.weights_dir).resolve())
    job = BatchJob(
        task=args.task,
        recipe=FeatureRecipe(args.backbone, options, args.device),
        match_options=options_from_args(args, MatchOptions),
        field_options=field_options_from_args(args),
        lesion_options=options_from_args(args, LesionOptions),
        series_options=options_from_args(args, SeriesOptions),
        write_inverse=args.inverse,
        write_warped=args.warped,
        share_limit_bytes=int(args.share_features_mb * 2**20),
    )
    spec = backbone_spec(args.backbone)
    if not spec.requires_weights:
        job.recipe.featurizer()  # refuse an unknown option before any cluster starts
    else:
        present, message = spec.weights_status(**{key: value for key, value in options.items()})
        if not present:
            raise MissingWeightsError(message)

    def report(record: dict) -> None:
        if not args.quiet:
            print(_line(record), flush=True)

    try:
        with ProgressBar(enabled=not args.quiet) as progress, dask_client(
            args.scheduler, args.workers, args.threads_per_worker, args.memory_limit
        ) as client:
            records = run_batch(rows, job, out, client, progress, report)
    except KeyboardInterrupt:
        discard_staging(out)  # a local cluster is closed; a remote worker still on a row removes its own
        raise
    failed = [record for record in records if record["status"] == "failed"]
    print(f"{len(records) - len(failed)} of {len(records)} rows done; summary: {out / 'summary.csv'}")
    if failed:
        print(f"{len(failed)} rows failed; their errors are in {out / 'summary.csv'}", file=sys.stderr)
        return 1
    return 0
