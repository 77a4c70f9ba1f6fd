"""``meddift register FIXED MOVING --out-transform T``: a dense displacement field from MOVING to FIXED."""

from __future__ import annotations

import argparse

from .common import ProgressBar, add_backbone_arguments, check_point_output, featurizer_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="compute a dense displacement field (transform) between two volumes",
        description="Register MOVING to FIXED. The transform is an ITK displacement field on the fixed grid "
        "(LPS mm) that maps fixed points to moving points and resamples the moving volume onto the fixed one; "
        "Slicer, ITK and SimpleITK load it as a displacement field transform (.nii.gz, .nrrd, .mha or .h5).",
    )
    parser.add_argument("fixed", help="fixed volume: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("moving", help="moving volume: NIfTI, NRRD, MHA or a DICOM folder")
    parser.add_argument("--out-transform", required=True, help="displacement field: .nii.gz, .nrrd, .mha or .h5")
    parser.add_argument("--out-inverse", help="inverse field on the moving grid (moving points to fixed)")
    parser.add_argument("--out-warped", help="the moving volume resampled onto the fixed grid")
    parser.add_argument("--points", help="fixed points to carry to the moving volume (.mrk.json, .fcsv, .csv, .txt)")
    parser.add_argument("--out-points", help="the points pushed through the field (.mrk.json, .fcsv or .csv)")
    parser.add_argument("--mask", help="fixed-image mask (non-zero inside) replacing the automatic body mask")
    add_backbone_arguments(parser)
    parser.add_argument("--search-radius-mm", type=float, default=24.0,
                        help="largest motion searched for, mm (default 24)")
    parser.add_argument("--grid-spacing-mm", type=float, default=6.0, help="lattice of searched points, mm (default 6)")
    parser.add_argument("--smoothness-mm", type=float, default=10.0,
                        help="smoothing length of the fitted field, mm (default 10)")
    parser.add_argument("--optimise-iterations", type=int, default=10,
                        help="instance optimisation steps (0: off; default 10)")
    parser.add_argument("--regularisation", type=float, default=0.1,
                        help="diffusion penalty of the instance optimisation (default 0.1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..core.errors import BadInputError
    from ..core.io import PointSet, read_points, read_volume, write_points
    from ..core.progress import scaled
    from ..field import FieldLevel, FieldOptions, register_and_write, transform_points
    from ..field.displacement import check_field_path, read_field

    if (args.points is None) != (args.out_points is None):
        raise BadInputError("--points and --out-points go together")
    check_field_path(args.out_transform)
    if args.out_inverse:
        check_field_path(args.out_inverse)
    if args.out_points:
        check_point_output(args.out_points)
    options = FieldOptions(
        levels=(FieldLevel(args.grid_spacing_mm, args.search_radius_mm, args.smoothness_mm),),
        optimise_iterations=args.optimise_iterations,
        optimise_regularisation=args.regularisation,
    )
    device = resolve_device(args.device)
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    mask = read_volume(args.mask) if args.mask else None
    points = read_points(args.points, fixed.geometry) if args.points else None
    featurizer = featurizer_from_args(args, device)
    with ProgressBar(enabled=not args.quiet) as progress, out_of_memory_as_error(device):
        fixed_features = featurizer.extract(fixed, scaled(progress, 0.0, 0.2)).to("cpu")
        moving_features = featurizer.extract(moving, scaled(progress, 0.2, 0.4)).to("cpu")
        summary = register_and_write(
            fixed, moving, fixed_features, moving_features, args.out_transform, args.out_inverse,
            args.out_warped, options, scaled(progress, 0.4, 1.0), mask=mask,
        )
    if points is not None:
        moved = transform_points(read_field(args.out_transform), points.points_lps_mm)
        write_points(PointSet(moved, points.labels, points.descriptions), args.out_points)
    jacobian = summary["jacobian"]
    print(f"Registered with backbone '{featurizer.name}' on {device} in {summary['seconds']['total']:.1f} s.")
    print(f"  transform: {summary['transform']} (mean displacement {summary['displacement_mm']['mean']:.2f} mm, "
          f"max {summary['displacement_mm']['max']:.2f} mm)")
    print(f"  Jacobian determinant: min {jacobian['min']:.3f}, folding {100 * jacobian['fraction_folding']:.3f} %")
    for name in ("inverse", "warped"):
        if summary[name]:
            print(f"  {name}: {summary[name]}")
    if points is not None:
        print(f"  points: {args.out_points} ({len(points)} carried through the field)")
    return 0
