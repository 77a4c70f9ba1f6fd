"""``meddift track BASELINE FOLLOWUP [FOLLOWUP ...] --lesions LESIONS --out DIR``: find, segment and measure
lesions in one follow-up (the pair's files, :mod:`MedDIFTLib.lesions.outputs`) or through a series
(:mod:`MedDIFTLib.lesions.series`, its files: :mod:`MedDIFTLib.lesions.series_outputs`)."""

from __future__ import annotations

import argparse
import sys

from ..core.options import FieldOptions, LesionOptions, SeriesOptions, describe
from .common import (
    FIELD_FLAGS,
    ProgressBar,
    add_backbone_arguments,
    add_field_level_options,
    add_option,
    check_memory_here,
    featurizer_from_args,
    field_options_from_args,
    given_options,
    options_from_args,
)

SERIES_FLAGS = {"route": "--series", "agreement_mm": "--agreement-mm", "measurable_mm": "--measurable-mm",
                "max_targets": "--max-targets"}
"""The flag of each :class:`SeriesOptions` field: they act only with several follow-ups."""

CSV_COLUMNS = ("label,l,p,s,confidence,volume_baseline_ml,volume_followup_ml,volume_change_pct,"
               "diameter_baseline_mm,diameter_followup_mm,status")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "track",
        help="track lesions from a baseline to one or more follow-up CTs: centre, segmentation, volume, diameters "
        "and, over a series, the RECIST 1.1 response",
        description="Track each lesion of BASELINE into FOLLOWUP. LESIONS is a labelmap on the baseline grid "
        "(one positive integer label per lesion: .nii.gz, .nrrd, .seg.nrrd) or a point file (one point per "
        "lesion, labels kept: .mrk.json, .fcsv, .csv), segmented at baseline from the point. The labelmap is "
        "carried onto the follow-up grid through a dense field (fixed = follow-up, moving = baseline), each "
        "lesion's centre is matched by the correspondence engine (confidence, forward-backward distance) and "
        "its segmentation is refined to the follow-up image. DIR gets followup_lesions.nii.gz (same label "
        f"values), lesions.csv ({CSV_COLUMNS}; l,p,s = follow-up centre, LPS mm; status ok or flags joined by ';': "
        "not_found, leaves_volume, merges, low_confidence, touches_border, unsupported_growth), report.md and "
        "lesions.png. With several FOLLOWUPs (in time order) each lesion is followed through all of them, "
        "chained (from the previous follow-up), direct (from the baseline) or auto (both; the more confident where "
        "they disagree): DIR gets followup_1_lesions.nii.gz, followup_2_lesions.nii.gz, ..., lesions.csv (one row "
        "per lesion and time point), response.csv (sum of the target lesions' longest diameters and the RECIST 1.1 "
        "response per time point), report.md, growth.png and lesions.png.",
    )
    parser.add_argument("baseline", help="baseline CT: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("followup", nargs="+", help="follow-up CT(s) in time order: NIfTI, NRRD, MHA or DICOM folders")
    parser.add_argument("--lesions", required=True, help="baseline labelmap (.nii.gz, .nrrd, .seg.nrrd) or points "
                        "(.mrk.json, .fcsv, .csv)")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    add_backbone_arguments(parser)
    add_option(parser, LesionOptions, "refine", "--no-refine",
               help="keep the carried labelmap as it is (default: refine it to the follow-up image)")
    add_option(parser, LesionOptions, "growth_margin_mm")
    add_option(parser, LesionOptions, "largest_volume_factor")
    add_option(parser, LesionOptions, "seed_radius_mm")
    add_option(parser, LesionOptions, "centre_search_radius_mm")
    add_option(parser, LesionOptions, "field_margin_mm")
    add_option(parser, LesionOptions, "confidence_threshold")
    add_option(parser, SeriesOptions, "route", SERIES_FLAGS["route"],
               help="several follow-ups: " + describe(SeriesOptions, "route"))
    for name in ("agreement_mm", "measurable_mm", "max_targets"):
        add_option(parser, SeriesOptions, name, SERIES_FLAGS[name])
    add_field_level_options(parser, smoothness=False)
    add_option(parser, FieldOptions, "optimise_iterations")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return _run_pair(args) if len(args.followup) == 1 else _run_series(args)


def _run_pair(args: argparse.Namespace) -> int:
    from ..core.budget import estimate_register
    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..core.io import check_outputs_apart, read_volume
    from ..core.progress import scaled
    from ..lesions.inputs import read_lesions
    from ..lesions.outputs import check_outputs, write_outputs
    from ..lesions.series import check_series
    from ..lesions.track import track_lesions

    series_given = given_options(args, SeriesOptions)  # checked as in a series, though unused
    if series_given:
        print(f"note: {', '.join(SERIES_FLAGS[name] for name in series_given)} only act with several follow-ups; "
              "with one, the pair is tracked (baseline -> follow-up, as every route's first step) and no response "
              "is assessed", file=sys.stderr)
    paths = check_outputs(args.out)
    followup_path = args.followup[0]
    check_outputs_apart({f"--out {path.name}": path for path in paths.values()},
                        {"BASELINE": args.baseline, "FOLLOWUP": followup_path, "--lesions": args.lesions})
    options = options_from_args(args, LesionOptions)
    field_options = field_options_from_args(args)
    device = resolve_device(args.device)
    baseline = read_volume(args.baseline)
    followup = read_volume(followup_path)
    check_series(baseline, [followup])  # the same modality and region as every series' follow-up
    lesions = read_lesions(args.lesions, baseline)
    check_memory_here(estimate_register(followup.geometry, baseline.geometry, field_options, FIELD_FLAGS, "track"))
    featurizer = featurizer_from_args(args, device)
    with ProgressBar(enabled=not args.quiet) as progress, out_of_memory_as_error(device):
        around_lesions = options.field_margin_mm > 0
        baseline_features = _features(featurizer, baseline, device, around_lesions, scaled(progress, 0.0, 0.15))
        followup_features = _features(featurizer, followup, device, around_lesions, scaled(progress, 0.15, 0.3))
        result = track_lesions(baseline, followup, lesions, baseline_features, followup_features, options,
                               field_options, progress=scaled(progress, 0.3, 1.0))
    write_outputs(result, baseline, followup, args.out)
    print(f"Tracked {len(result.lesions)} lesion(s) with backbone '{featurizer.name}' on {device} in "
          f"{result.seconds['total']:.1f} s.")
    print(f"  {'lesion':<12}{'status':<18}{'mL before':>10}{'mL after':>10}{'change %':>10}{'conf':>6}")
    for lesion in result.lesions:
        print(f"  {lesion.name:<12}{lesion.status:<18}{lesion.baseline.volume_ml:10.3f}"
              f"{lesion.followup.volume_ml:10.3f}{lesion.volume_change_pct:10.1f}{lesion.confidence:6.2f}")
    for path in paths.values():
        print(f"Wrote {path}")
    return 0


def _features(featurizer, volume, device, around_lesions: bool, progress):
    """The volume's feature pyramid on ``device``: computed where tracking reads it (the boxes around the
    lesions) when the field is computed only there and the backbone offers that on the CPU, else whole."""
    from ..features.protocol import region_extractor

    extract_regions = region_extractor(featurizer, device) if around_lesions else None
    if extract_regions is not None:
        return extract_regions(volume)
    return featurizer.extract(volume, progress).to(device)


def _run_series(args: argparse.Namespace) -> int:
    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..core.io import check_outputs_apart, read_volume
    from ..lesions.inputs import read_lesions
    from ..lesions.series import check_series, series_estimate, track_series
    from ..lesions.series_outputs import check_series_outputs, write_series_outputs

    paths = check_series_outputs(args.out, len(args.followup))
    inputs = {"BASELINE": args.baseline, "--lesions": args.lesions}
    inputs.update({f"FOLLOWUP {k}": path for k, path in enumerate(args.followup, start=1)})
    check_outputs_apart({f"--out {path.name}": path for path in paths.values()}, inputs)
    options = options_from_args(args, LesionOptions)
    series_options = options_from_args(args, SeriesOptions)
    field_options = field_options_from_args(args)
    device = resolve_device(args.device)
    baseline = read_volume(args.baseline)
    followups = [read_volume(path) for path in args.followup]
    check_series(baseline, followups)
    lesions = read_lesions(args.lesions, baseline)
    scans = [baseline, *followups]
    check_memory_here(series_estimate(scans, series_options.route, field_options, FIELD_FLAGS))
    featurizer = featurizer_from_args(args, device)
    with ProgressBar(enabled=not args.quiet) as progress, out_of_memory_as_error(device):
        result = track_series(baseline, followups, lesions,
                              lambda volume, step: featurizer.extract(volume, step).to(device), options,
                              series_options, field_options, progress)
    write_series_outputs(result, scans, args.out)
    print(f"Tracked {len(lesions.labels)} lesion(s) through {len(followups)} follow-ups ({result.route}) with "
          f"backbone '{featurizer.name}' on {device} in {result.seconds['total']:.1f} s.")
    print(f"  {'time point':<12}{'SLD mm':>8}{'vs baseline %':>15}{'vs nadir %':>12}  response")
    for response in result.responses:
        when = "baseline" if response.time_point == 0 else f"T{response.time_point}"
        print(f"  {when:<12}{response.sld_mm:8.1f}{response.change_from_baseline_pct:15.1f}"
              f"{response.change_from_nadir_pct:12.1f}  {response.category or '-'}")
    for path in paths.values():
        print(f"Wrote {path}")
    return 0
