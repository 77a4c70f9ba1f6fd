"""``meddift register FIXED MOVING --out-transform T``: a dense displacement field from MOVING to FIXED."""

from __future__ import annotations

import argparse

from ..core.options import FieldOptions
from .common import (
    FIELD_FLAGS,
    MATCH_COLUMNS,
    ProgressBar,
    add_backbone_arguments,
    add_field_level_options,
    add_option,
    check_memory_here,
    check_point_output,
    featurizer_from_args,
    field_options_from_args,
    read_input_points,
)
from .remote import add_server_arguments, server_client

LOADING = (
    "Loading the field: a .h5 file is an ITK transform (SimpleITK: sitk.ReadTransform(path); Slicer: drag and "
    "drop, it loads as a transform). A .nii.gz, .nii, .nrrd or .mha file is a displacement image (SimpleITK: "
    "sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)); "
    "sitk.ReadTransform does not read it; Slicer: Add Data and choose 'Transform' as its type)."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="compute a dense displacement field (transform) between two volumes",
        description="Register MOVING to FIXED. The transform is an ITK displacement field on the fixed grid "
        "(LPS mm) that maps fixed points to moving points and resamples the moving volume onto the fixed one. "
        + LOADING + f" --out-points writes the columns of meddift match ({MATCH_COLUMNS}); the field has no "
        "per-point confidence, so those scores are nan and a point is reliable when it lies on the field's grid "
        "and the field does not fold there (Jacobian determinant > 0). The run's summary (options, Jacobian "
        "determinant statistics, displacement, times) is saved beside the transform as TRANSFORM.json.",
    )
    parser.add_argument("fixed", help="fixed volume: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("moving", help="moving volume: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("--out-transform", required=True, help="displacement field: .nii.gz, .nrrd, .mha or .h5")
    parser.add_argument("--out-inverse", help="inverse field on the moving grid (moving points to fixed)")
    parser.add_argument("--out-warped", help="the moving volume resampled onto the fixed grid "
                        "(.nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd)")
    parser.add_argument("--points", help="fixed points to carry to the moving volume (.mrk.json, .fcsv, .csv, .txt)")
    parser.add_argument("--out-points", help="the points pushed through the field (.mrk.json, .fcsv or .csv)")
    parser.add_argument("--mask", help="fixed-image mask (non-zero inside) replacing the automatic body mask")
    add_backbone_arguments(parser)
    add_field_level_options(parser)
    add_option(parser, FieldOptions, "optimise_iterations")
    add_option(parser, FieldOptions, "optimise_regularisation", "--regularisation")
    add_server_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.budget import estimate_register
    from ..core.errors import BadInputError
    from ..core.io import (
        check_output_path,
        check_outputs_apart,
        check_overlap,
        check_volume_output,
        read_volume,
        write_points,
    )
    from ..core.options import to_json
    from ..field import carried_points, read_field, summary_path, write_summary
    from ..field.displacement import check_field_path

    if (args.points is None) != (args.out_points is None):
        raise BadInputError("--points and --out-points go together")
    if args.server:
        server_client(args)  # refuses a bad address, token file or certificate before any work
    for path in filter(None, (args.out_transform, args.out_inverse)):
        check_field_path(path)
        check_output_path(path)
    if args.out_warped:
        check_volume_output(args.out_warped)
    if args.out_points:
        check_point_output(args.out_points)
    check_output_path(summary_path(args.out_transform))
    check_outputs_apart(
        {"--out-transform": args.out_transform, "--out-inverse": args.out_inverse, "--out-warped": args.out_warped,
         "--out-points": args.out_points, "the summary": summary_path(args.out_transform)},
        {"FIXED": args.fixed, "MOVING": args.moving, "--points": args.points, "--mask": args.mask},
    )
    options = field_options_from_args(args)
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    check_overlap(fixed, moving)
    points = read_input_points(args.points, fixed.geometry) if args.points else None
    if not args.server:
        check_memory_here(estimate_register(fixed.geometry, moving.geometry, options, FIELD_FLAGS))
    if args.server:
        from .remote import register_remotely

        with ProgressBar(enabled=not args.quiet) as progress:
            summary = register_remotely(args, options, progress)
        backbone, device = args.backbone, f"the server {args.server}"
    else:
        summary, backbone, device = _register_here(args, fixed, moving, options)
    if points is not None:
        write_points(carried_points(read_field(args.out_transform), points), args.out_points)
    write_summary(args.out_transform, summary, args.out_points, backbone, str(device), to_json(options))
    jacobian = summary["jacobian"]
    print(f"Registered with backbone '{backbone}' on {device} in {summary['seconds']['total']:.1f} s.")
    print(f"  transform: {summary['transform']} (mean displacement {summary['displacement_mm']['mean']:.2f} mm, "
          f"max {summary['displacement_mm']['max']:.2f} mm)")
    print(f"  Jacobian determinant: min {jacobian['min']:.3f}, folding {100 * jacobian['fraction_folding']:.3f} %")
    for name in ("inverse", "warped"):
        if summary[name]:
            print(f"  {name}: {summary[name]}")
    if points is not None:
        print(f"  points: {args.out_points} ({len(points)} carried through the field)")
    print(f"  summary: {summary_path(args.out_transform)}")
    return 0


def _register_here(args: argparse.Namespace, fixed, moving, options: FieldOptions):
    """The summary of a registration computed on this computer, the backbone's name and the device."""
    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..core.io import read_volume
    from ..core.progress import scaled
    from ..field import register_and_write

    device = resolve_device(args.device)
    mask = read_volume(args.mask) if args.mask else None
    featurizer = featurizer_from_args(args, device)
    with ProgressBar(enabled=not args.quiet) as progress, out_of_memory_as_error(device):
        fixed_features = featurizer.extract(fixed, scaled(progress, 0.0, 0.2)).to("cpu")
        moving_features = featurizer.extract(moving, scaled(progress, 0.2, 0.4)).to("cpu")
        summary = register_and_write(
            fixed, moving, fixed_features, moving_features, args.out_transform, args.out_inverse,
            args.out_warped, options, scaled(progress, 0.4, 1.0), mask=mask,
        )
    return summary, featurizer.name, device
