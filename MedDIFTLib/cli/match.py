"""``meddift match FIXED MOVING --points IN --out OUT``: find fixed points in the moving volume."""

from __future__ import annotations

import argparse
import time

from ..core.options import MatchOptions, RunSettings
from .common import (
    MATCH_COLUMNS,
    ProgressBar,
    add_backbone_arguments,
    add_option,
    check_memory_here,
    check_point_output,
    featurizer_from_args,
    options_from_args,
    read_input_points,
)
from .remote import add_server_arguments, server_client


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "match",
        help="find where points of the fixed volume lie in the moving volume",
        description="Match points of FIXED into MOVING. Points and results are in LPS mm (RAS in .mrk.json "
        "or .fcsv files is converted). The output keeps the input labels; each match carries a confidence "
        "in [0, 1] and its forward-backward distance in mm; unreliable matches are flagged, never dropped. "
        f"Defaults: backbone {RunSettings.backbone}, mode {MatchOptions.mode} (search within "
        f"{MatchOptions.search_radius_mm:g} mm of the same world position). A .csv output has the columns "
        f"{MATCH_COLUMNS} (reliable: 1 or 0); .mrk.json and .fcsv keep the scores in the description and "
        "leave unreliable points unselected.",
    )
    parser.add_argument("fixed", help="fixed volume: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("moving", help="moving volume: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("--points", required=True, help="fixed points: .mrk.json, .fcsv, .csv or DIR-Lab .txt")
    parser.add_argument("--out", required=True, help="matched points: .mrk.json, .fcsv or .csv")
    add_backbone_arguments(parser)
    add_option(parser, MatchOptions, "search_radius_mm")
    add_option(parser, MatchOptions, "mode")
    add_option(parser, MatchOptions, "coarse_to_fine", "--full-search",
               help="score every voxel of the search sphere (default: a coarse lattice first, then refine)")
    add_option(parser, MatchOptions, "exact")
    add_option(parser, MatchOptions, "confidence_threshold")
    add_option(parser, MatchOptions, "context_mm")
    add_server_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core.budget import estimate_match
    from ..core.io import check_outputs_apart, check_overlap, read_volume, write_points
    from ..matching import check_points

    output = check_point_output(args.out)
    if args.server:
        server_client(args)  # refuses a bad address, token file or certificate before any work
    check_outputs_apart({"--out": args.out}, {"FIXED": args.fixed, "MOVING": args.moving, "--points": args.points})
    options = options_from_args(args, MatchOptions)
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    check_overlap(fixed, moving)
    points = read_input_points(args.points, fixed.geometry)
    check_points(fixed.geometry, points.points_lps_mm)
    if not args.server:
        check_memory_here(estimate_match(fixed.geometry, moving.geometry, options.memory_budget_mb))
    started = time.perf_counter()
    if args.server:
        from .remote import match_remotely

        with ProgressBar(enabled=not args.quiet) as progress:
            result, version = match_remotely(args, points, options, progress)
        backbone, device = args.backbone, f"the server {args.server} (meddift {version})"
    else:
        result, backbone, device = _match_here(args, fixed, moving, points, options)
    seconds = time.perf_counter() - started
    matched = result.point_set(points.labels)
    write_points(matched, output)
    displacement = np.linalg.norm(result.points_lps_mm - points.points_lps_mm, axis=1)
    print(f"Matched {len(points)} points with backbone '{backbone}' on {device} in {seconds:.1f} s.")
    print(f"  reliable: {int(result.reliable.sum())}/{len(points)} (confidence >= {options.confidence_threshold})")
    print(f"  mean confidence {np.mean(result.confidence):.2f}; mean displacement {displacement.mean():.2f} mm")
    if len(points) <= 20:
        print(f"  {'label':<12}{'L':>9}{'P':>9}{'S':>9}{'moved mm':>10}{'conf':>6}")
        for label, point, moved, confidence, reliable in zip(
            points.labels, result.points_lps_mm, displacement, result.confidence, result.reliable
        ):
            flag = "" if reliable else "  unreliable"
            print(f"  {label:<12}{point[0]:9.2f}{point[1]:9.2f}{point[2]:9.2f}{moved:10.2f}{confidence:6.2f}{flag}")
    print(f"Wrote {output}")
    return 0


def _match_here(args: argparse.Namespace, fixed, moving, points, options: MatchOptions):
    """The correspondences computed on this computer, the backbone's name and the device."""
    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..core.progress import scaled
    from ..matching import match_points

    device = resolve_device(args.device)
    featurizer = featurizer_from_args(args, device)
    with ProgressBar(enabled=not args.quiet) as progress, out_of_memory_as_error(device):
        fixed_features = featurizer.extract(fixed, scaled(progress, 0.0, 0.35)).to(device)
        moving_features = featurizer.extract(moving, scaled(progress, 0.35, 0.7)).to(device)
        result = match_points(
            fixed_features, moving_features, points.points_lps_mm, options=options, progress=scaled(progress, 0.7, 1.0)
        )
    return result, featurizer.name, device
