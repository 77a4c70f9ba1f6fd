"""``meddift track BASELINE FOLLOWUP --lesions LESIONS --out DIR``: find, segment and measure lesions."""

from __future__ import annotations

import argparse

from ..core.options import FieldOptions, LesionOptions
from .common import (
    FIELD_FLAGS,
    ProgressBar,
    add_backbone_arguments,
    add_field_level_options,
    add_option,
    check_memory_here,
    featurizer_from_args,
    field_options_from_args,
    options_from_args,
)

CSV_COLUMNS = ("label,l,p,s,confidence,volume_baseline_ml,volume_followup_ml,volume_change_pct,"
               "diameter_baseline_mm,diameter_followup_mm,status")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "track",
        help="track lesions from a baseline to a follow-up CT: centre, segmentation, volume and diameters",
        description="Track each lesion of BASELINE into FOLLOWUP. LESIONS is a labelmap on the baseline grid "
        "(one positive integer label per lesion: .nii.gz, .nrrd, .seg.nrrd) or a point file (one point per "
        "lesion, labels kept: .mrk.json, .fcsv, .csv), segmented at baseline from the point. The labelmap is "
        "carried onto the follow-up grid through a dense field (fixed = follow-up, moving = baseline), each "
        "lesion's centre is matched by the correspondence engine (confidence, forward-backward distance) and "
        "its segmentation is refined to the follow-up image. DIR gets followup_lesions.nii.gz (same label "
        f"values), lesions.csv ({CSV_COLUMNS}; l,p,s = follow-up centre, LPS mm; status ok or flags joined by ';': "
        "not_found, leaves_volume, merges, low_confidence, touches_border, unsupported_growth), report.md and "
        "lesions.png.",
    )
    parser.add_argument("baseline", help="baseline CT: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("followup", help="follow-up CT: NIfTI, NRRD, MHA or a DICOM folder")
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
    add_option(parser, LesionOptions, "confidence_threshold")
    add_field_level_options(parser, smoothness=False)
    add_option(parser, FieldOptions, "optimise_iterations")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.budget import estimate_register
    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..core.io import check_outputs_apart, check_overlap, read_volume
    from ..core.progress import scaled
    from ..lesions.inputs import read_lesions
    from ..lesions.outputs import check_outputs, write_outputs
    from ..lesions.track import track_lesions

    paths = check_outputs(args.out)
    check_outputs_apart({f"--out {path.name}": path for path in paths.values()},
                        {"BASELINE": args.baseline, "FOLLOWUP": args.followup, "--lesions": args.lesions})
    options = options_from_args(args, LesionOptions)
    field_options = field_options_from_args(args)
    device = resolve_device(args.device)
    baseline = read_volume(args.baseline)
    followup = read_volume(args.followup)
    check_overlap(baseline, followup)
    lesions = read_lesions(args.lesions, baseline)
    check_memory_here(estimate_register(followup.geometry, baseline.geometry, field_options, FIELD_FLAGS, "track"))
    featurizer = featurizer_from_args(args, device)
    with ProgressBar(enabled=not args.quiet) as progress, out_of_memory_as_error(device):
        baseline_features = featurizer.extract(baseline, scaled(progress, 0.0, 0.15)).to(device)
        followup_features = featurizer.extract(followup, scaled(progress, 0.15, 0.3)).to(device)
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
