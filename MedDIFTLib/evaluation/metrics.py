"""Target registration error (TRE) statistics in mm."""

from __future__ import annotations

import numpy as np


def tre_mm(predicted_lps_mm: np.ndarray, true_lps_mm: np.ndarray) -> np.ndarray:
    """Euclidean distance (N,) in mm between corresponding points (N, 3)."""
    return np.linalg.norm(np.asarray(predicted_lps_mm, float) - np.asarray(true_lps_mm, float), axis=1)


def error_stats(errors_mm: np.ndarray) -> dict[str, float]:
    """Mean, std, median, 95th percentile and max of errors in mm."""
    errors = np.asarray(errors_mm, float)
    return {
        "mean": float(errors.mean()),
        "std": float(errors.std()),
        "p50": float(np.percentile(errors, 50)),
        "p95": float(np.percentile(errors, 95)),
        "max": float(errors.max()),
    }


def tre_stats(predicted_lps_mm: np.ndarray, true_lps_mm: np.ndarray) -> dict[str, float]:
    """:func:`error_stats` of the TRE between corresponding points, plus their ``count``."""
    errors = tre_mm(predicted_lps_mm, true_lps_mm)
    return {**error_stats(errors), "count": int(len(errors))}


def confidence_correlation(confidence: np.ndarray, errors_mm: np.ndarray) -> dict[str, float | None]:
    """Spearman and Pearson correlation of per-point confidence with the error (mm).

    A confidence that follows the error correlates negatively (high confidence, small error). Each is
    None where it is undefined: fewer than three points, or a constant confidence or error."""
    from scipy import stats

    confidence = np.asarray(confidence, float).ravel()
    errors = np.asarray(errors_mm, float).ravel()
    finite = np.isfinite(confidence) & np.isfinite(errors)
    confidence, errors = confidence[finite], errors[finite]
    if len(errors) < 3 or np.ptp(confidence) == 0 or np.ptp(errors) == 0:
        return {"spearman": None, "pearson": None}
    return {"spearman": float(stats.spearmanr(confidence, errors).statistic),
            "pearson": float(stats.pearsonr(confidence, errors).statistic)}


def naive_full_resolution_similarity(fixed, moving, fixed_ijk, level_weights=None):
    """The reference implementation's matching, for comparison only: every level's features are
    upsampled (trilinear, ``align_corners=False``) to the image grid, L2-normalised, and the
    weighted cosine with the fixed descriptor at voxel ``fixed_ijk`` is computed everywhere.

    Memory grows with all channels x all voxels: this is what :mod:`MedDIFTLib.matching` avoids.
    Returns the fused similarity volume ``[k, j, i]`` on the moving image grid.
    """
    import torch
    import torch.nn.functional as F

    weights = level_weights or [level.weight for level in moving.levels]
    total = float(sum(weights))
    i, j, k = (int(v) for v in fixed_ijk)
    fused = None
    for fixed_level, moving_level, weight in zip(fixed.levels, moving.levels, weights):
        fixed_full = F.interpolate(fixed_level.values()[None].float(), size=fixed.image_geometry.shape_kji,
                                   mode="trilinear", align_corners=False)[0]
        descriptor = F.normalize(fixed_full[:, k, j, i], dim=0)
        del fixed_full
        moving_full = F.interpolate(moving_level.values()[None].float(), size=moving.image_geometry.shape_kji,
                                    mode="trilinear", align_corners=False)[0]
        similarity = torch.einsum("ckji,c->kji", F.normalize(moving_full, dim=0), descriptor) * (weight / total)
        fused = similarity if fused is None else fused + similarity
    return fused
