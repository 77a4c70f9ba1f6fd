"""The lesion sheet (``lesions.png``): per lesion, its axial baseline slice beside its follow-up slice,
each with the lesion's contour, cropped around the lesion (matplotlib, no display needed)."""

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


def lesion_sheet(result, baseline: Volume, followup: Volume) -> bytes:
    """PNG bytes of the sheet for a :class:`~.track.TrackResult`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(result.lesions), 1)
    figure, axes = plt.subplots(count, 2, figsize=(6.0, 3.0 * count), squeeze=False)
    for row, lesion in zip(axes, result.lesions):
        for axis, volume, labelmap, centre, when in (
            (row[0], baseline, result.baseline_labelmap, lesion.baseline.centre_lps_mm, "baseline"),
            (row[1], followup, result.followup_labelmap, lesion.centre_lps_mm, "follow-up"),
        ):
            axis.set_axis_off()
            if not np.all(np.isfinite(centre)):
                axis.set_title(f"{lesion.name} {when}: not found", fontsize=9)
                continue
            image, mask, extent = _axial_crop(volume, labelmap == lesion.label, np.asarray(centre))
            axis.imshow(image, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], extent=extent)
            if mask.any() and not mask.all():
                height, width = mask.shape
                xs = (np.arange(width) + 0.5) * (extent[1] / width)
                ys = (np.arange(height) + 0.5) * (extent[2] / height)
                axis.contour(xs, ys, mask.astype(float), levels=[0.5], colors=[lesion.color or (1.0, 0.8, 0.0)],
                             linewidths=1.2)
            measured = lesion.baseline if when == "baseline" else lesion.followup
            axis.set_title(f"{lesion.name} {when}: {measured.volume_ml:.2f} mL, {measured.long_mm:.1f} mm",
                           fontsize=9)
        row[1].text(0.02, 0.02, lesion.status, color="white", fontsize=8, transform=row[1].transAxes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
