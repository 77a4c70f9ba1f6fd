"""The lesion sheet (``lesions.png``): per lesion, its axial baseline slice beside its follow-up slice
(a series: beside each follow-up's), each with the lesion's contour, cropped around the lesion
(matplotlib, no display needed)."""

from __future__ import annotations

import io

import numpy as np

from ..core.io.volumes import Volume
from .measure import axial_axis

WINDOW_HU = (-1000.0, 400.0)
CROP_MM = 30.0


def _axial_crop(volume: Volume, mask: np.ndarray, centre_lps_mm: np.ndarray):
    """The axial slice through ``centre_lps_mm`` cropped to ``CROP_MM`` around it: image, mask, extent (mm)."""
    geometry = volume.geometry
    axis = axial_axis(geometry)
    ijk = np.clip(np.round(geometry.lps_to_ijk(np.asarray(centre_lps_mm, float)[None])[0]), 0,
                  np.asarray(geometry.shape_ijk) - 1).astype(int)
    index = [slice(None)] * 3
    index[2 - axis] = int(ijk[axis])
    image, labels = volume.voxels[tuple(index)], mask[tuple(index)]
    in_plane = [n for n in range(3) if n != axis][::-1]
    spacing = np.asarray([geometry.spacing_mm[n] for n in in_plane])
    centre = np.asarray([ijk[n] for n in in_plane])
    half = np.ceil(CROP_MM / spacing).astype(int)
    low, high = np.maximum(centre - half, 0), np.minimum(centre + half + 1, image.shape)
    crop = (slice(low[0], high[0]), slice(low[1], high[1]))
    extent = (0.0, (high[1] - low[1]) * spacing[1], (high[0] - low[0]) * spacing[0], 0.0)
    return image[crop], labels[crop], extent


def _panel(axis, volume: Volume, mask: np.ndarray, centre_lps_mm, title: str, measured, color) -> None:
    """One lesion at one time point on ``axis``: its axial crop with the contour of ``mask``, titled
    ``title`` and its measurement (``not found`` without a centre)."""
    axis.set_axis_off()
    if not np.all(np.isfinite(centre_lps_mm)):
        axis.set_title(f"{title}: not found", fontsize=9)
        return
    image, mask, extent = _axial_crop(volume, mask, np.asarray(centre_lps_mm))
    axis.imshow(image, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], extent=extent)
    if mask.any() and not mask.all():
        height, width = mask.shape
        xs = (np.arange(width) + 0.5) * (extent[1] / width)
        ys = (np.arange(height) + 0.5) * (extent[2] / height)
        axis.contour(xs, ys, mask.astype(float), levels=[0.5], colors=[color or (1.0, 0.8, 0.0)], linewidths=1.2)
    axis.set_title(f"{title}: {measured.volume_ml:.2f} mL, {measured.long_mm:.1f} mm", fontsize=9)


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def _figure(rows: int, columns: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(max(rows, 1), columns, figsize=(3.0 * columns, 3.0 * max(rows, 1)), squeeze=False)


def lesion_sheet(result, baseline: Volume, followup: Volume) -> bytes:
    """PNG bytes of the sheet for a :class:`~.track.TrackResult`."""
    figure, axes = _figure(len(result.lesions), 2)
    for row, lesion in zip(axes, result.lesions):
        _panel(row[0], baseline, result.baseline_labelmap == lesion.label, lesion.baseline.centre_lps_mm,
               f"{lesion.name} baseline", lesion.baseline, lesion.color)
        _panel(row[1], followup, result.followup_labelmap == lesion.label, lesion.centre_lps_mm,
               f"{lesion.name} follow-up", lesion.followup, lesion.color)
        row[1].text(0.02, 0.02, lesion.status, color="white", fontsize=8, transform=row[1].transAxes)
    return _png(figure)


def series_sheet(result, scans: list[Volume]) -> bytes:
    """PNG bytes of the sheet for a :class:`~.series.SeriesResult` and its ``scans`` (baseline first):
    one row per lesion, one column per time point."""
    labels = [visit.label for visit in result.visits[0]]
    figure, axes = _figure(len(labels), len(scans))
    for row, label in zip(axes, labels):
        for axis, visit, volume, labelmap in zip(row, result.timeline(label), scans, result.labelmaps):
            when = "baseline" if visit.time_point == 0 else f"T{visit.time_point}"
            _panel(axis, volume, labelmap == label, visit.centre_lps_mm, f"{visit.name} {when}", visit.measurement,
                   visit.color)
            if visit.time_point > 0:
                axis.text(0.02, 0.02, visit.status, color="white", fontsize=8, transform=axis.transAxes)
    return _png(figure)
