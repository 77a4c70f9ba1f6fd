"""The growth curves of a lesion series (``growth.png``): volume (mL) and longest axial diameter (mm)
at each time point, one line per lesion (a lesion gone is drawn at 0; a hollow marker where its size
is not the lesion's, see :data:`.series.NOT_EVALUABLE`), the RECIST 1.1 response of each follow-up
written under it (matplotlib, no display needed)."""

from __future__ import annotations

import io

import numpy as np

CATEGORY_COLORS = {"CR": "tab:green", "PR": "tab:green", "SD": "tab:gray", "PD": "tab:red", "NE": "tab:orange"}


def growth_figure(result) -> bytes:
    """PNG bytes of the growth curves of a :class:`~.series.SeriesResult`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    time_points = np.arange(len(result.scan_names))
    figure, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for label in [visit.label for visit in result.visits[0]]:
        timeline = result.timeline(label)
        first = timeline[0]
        name = f"{first.name}{' (target)' if label in result.targets else ''}"
        volumes_ml = [visit.measurement.volume_ml for visit in timeline]
        diameters_mm = [visit.diameter_mm for visit in timeline]
        for axis, values in ((axes[0], volumes_ml), (axes[1], diameters_mm)):
            line, = axis.plot(time_points, values, marker="o", color=first.color,
                              linestyle="-" if label in result.targets else "--", label=name)
            hollow = [n for n, visit in enumerate(timeline) if not visit.evaluable]
            if hollow:
                axis.plot(time_points[hollow], np.asarray(values)[hollow], marker="o", linestyle="none",
                          markerfacecolor="white", color=line.get_color())
    ticks = ["baseline", *(f"T{r.time_point}\n{r.category}" for r in result.responses[1:])]
    for axis, title in ((axes[0], "volume (mL)"), (axes[1], "longest axial diameter (mm)")):
        axis.set_title(title, fontsize=10)
        axis.set_xticks(time_points, ticks)
        for tick, response in zip(axis.get_xticklabels()[1:], result.responses[1:]):
            tick.set_color(CATEGORY_COLORS[response.category])
            tick.set_fontweight("bold")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle("Lesions over time (response: RECIST 1.1 on the target lesions)", fontsize=10, y=0.99)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
