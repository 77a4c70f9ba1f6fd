"""The real images of ../shared/data that the benchmarks use, found and loaded in one place: the chest
CTs they warp, and the real liver MRI pairs (``liver4dmri_real_pairs``: real breathing, 52 landmarks each).

``MEDDIFT_DATA`` names another data folder (default: ``shared/data`` beside the checkout). POPI can be
resampled to an isotropic spacing (Gaussian pre-smoothing to that spacing, trilinear, air outside),
as the registration and lesion benchmarks run it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

DATA_DIR = Path(os.environ.get("MEDDIFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CT_DIR = DATA_DIR / "chestct_single_real"
CASES = {"elastix": "elastix_lung_baseline_small", "pulmonary": "totalseg_pulmonary_crop", "popi": "popi_4dct_phase00"}
LIVER_DIR = DATA_DIR / "liver4dmri_real_pairs"


def case_folder(case: str) -> Path:
    """The folder of ``case`` (one of :data:`CASES`): ``image.nii.gz``, and landmarks where it has them."""
    return CT_DIR / CASES[case]


def image_path(case: str) -> Path:
    return case_folder(case) / "image.nii.gz"


def load_case(case: str, popi_spacing_mm: float | None = None):
    """The CT of ``case`` as a :class:`MedDIFTLib.core.io.Volume` named ``case``; POPI resampled to
    ``popi_spacing_mm`` (isotropic) when given."""
    import SimpleITK as sitk

    from MedDIFTLib.core.io import Volume, read_volume

    volume = read_volume(image_path(case))
    if case != "popi" or popi_spacing_mm is None:
        return replace(volume, name=case)
    image = volume.to_sitk()
    spacing = (popi_spacing_mm,) * 3
    size = [int(round(n * s / popi_spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    sigma = [max(popi_spacing_mm**2 - s**2, 0.0) ** 0.5 / 2.0 + 1e-3 for s in image.GetSpacing()]
    image = sitk.SmoothingRecursiveGaussian(image, sigma)
    image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                          image.GetDirection(), -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(image, case)


def load_liver_pairs():
    """The real liver MRI pairs of :data:`LIVER_DIR`, read as ``meddift eval`` reads them (the ``pairs``
    layout of :mod:`MedDIFTLib.evaluation.datasets`): one :class:`MedDIFTLib.evaluation.cases.CaseData` per
    pair, with both volumes and the 52 paired landmarks (LPS mm), in folder order."""
    from MedDIFTLib.evaluation.datasets import load_case as load_pair
    from MedDIFTLib.evaluation.datasets import open_dataset

    for case in open_dataset(LIVER_DIR, layout="pairs").cases:
        yield load_pair(case)
