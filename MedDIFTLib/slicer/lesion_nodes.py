"""Scene glue of lesion tracking: baseline lesions out to job files, follow-up results back in.

- :func:`write_baseline_lesions`: a baseline segmentation node (one lesion per segment; label
  value = segment order + 1) or a markups node (one lesion per control point) written as the
  ``--lesions`` file of ``meddift track`` (a labelmap on the baseline volume's grid, or points);
  it returns one :class:`LesionSegment` per lesion (label, segment ID, name, colour, baseline centre).
- :func:`fill_followup_segmentation`: ``followup_lesions.nii.gz`` into a segmentation node with
  the same segment IDs, names and colours (a given node is filled in place: its segments are
  replaced, the node is kept; a lesion not found stays as an empty segment).
- :func:`lesion_rows` / :func:`fill_lesion_table`: the lesions of a ``track`` result
  (:class:`~MedDIFTLib.worker.protocol.results.TrackedLesion`, the rows of ``lesions.csv``) as typed
  rows and as a table node (lesion, status, volumes, diameters, changes, confidence);
  :func:`jump_to_lesion` centres the baseline and follow-up views on a row's lesion.

Torch-free; the scene is RAS, the files LPS (x and y negate at this boundary only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError
from ..core.io import write_points
from ..core.io.points import RAS_FROM_LPS
from ..worker.protocol.results import TrackedLesion
from .nodes import markups_to_points, read_volume_file, volume_geometry, write_volume_node
from .views import FIXED_VIEW, MOVING_VIEW, centre_views

DEFAULT_COLOR = (1.0, 0.8, 0.0)
TABLE_COLUMNS = ("lesion", "status", "volume baseline (mL)", "volume follow-up (mL)", "volume change (%)",
                 "diameter baseline (mm)", "diameter follow-up (mm)", "diameter change (%)", "confidence")


@dataclass(frozen=True)
class LesionSegment:
    """One baseline lesion: its label value in the job files, segment ID, name, colour (RGB in [0, 1])
    and centre in the baseline (RAS mm; None when unknown)."""

    label: int
    segment_id: str
    name: str
    color: tuple[float, float, float]
    baseline_ras: tuple[float, float, float] | None


@dataclass(frozen=True)
class LesionRow:
    """One tracked lesion (a row of ``lesions.csv``) with its segment: volumes (mL), longest axial diameters (mm),
    changes (%), the centre match's confidence, the follow-up centre (RAS mm) and the status."""

    segment: LesionSegment
    status: str
    volume_baseline_ml: float
    volume_followup_ml: float
    volume_change_pct: float
    diameter_baseline_mm: float
    diameter_followup_mm: float
    confidence: float
    followup_ras: tuple[float, float, float] | None

    @property
    def diameter_change_pct(self) -> float:
        if not (math.isfinite(self.diameter_baseline_mm) and math.isfinite(self.diameter_followup_mm)):
            return math.nan
        return 100.0 * (self.diameter_followup_mm / self.diameter_baseline_mm - 1.0)


def lps_to_ras(lps) -> tuple[float, float, float] | None:
    """A point of the job files (LPS mm) in the scene (RAS mm); None when not finite (a lesion not found)."""
    values = np.asarray(lps, float) * RAS_FROM_LPS
    return tuple(float(v) for v in values) if np.all(np.isfinite(values)) else None


def _segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def _segmentation_class(name: str):
    """A class of Slicer's segmentation core or logic (``vtkSegment``, ...): from ``slicer_core`` (the
    wheel) or, inside Slicer, from ``slicer``."""
    try:
        import slicer_core as module
    except ImportError:
        import slicer as module
    return getattr(module, name)


def _node_ids(scene, node_class: str) -> set[str]:
    found = scene.GetNodesByClass(node_class)
    try:
        return {found.GetItemAsObject(index).GetID() for index in range(found.GetNumberOfItems())}
    finally:
        found.UnRegister(None)


def _labelmap_voxels(volume_node) -> np.ndarray:
    from vtkmodules.util import numpy_support

    image = volume_node.GetImageData()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])


def write_baseline_lesions(scene, lesions_node, baseline_volume_node, path: str | Path) -> list[LesionSegment]:
    """Write the lesions of a segmentation or markups node to ``path`` (a labelmap such as
    ``.nii.gz`` for a segmentation, a point file such as ``.mrk.json`` for markups)."""
    if lesions_node is None or baseline_volume_node is None:
        raise BadInputError("choose the baseline volume and its lesions (a segmentation or markups node)")
    if lesions_node.IsA("vtkMRMLMarkupsNode"):
        points = markups_to_points(lesions_node)
        write_points(points, path)
        return [LesionSegment(n + 1, label, label, DEFAULT_COLOR, lps_to_ras(point))
                for n, (label, point) in enumerate(zip(points.labels, points.points_lps_mm))]
    if not lesions_node.IsA("vtkMRMLSegmentationNode"):
        raise BadInputError(f"'{lesions_node.GetName()}' is neither a segmentation nor a markups node")
    from vtkmodules.vtkCommonCore import vtkStringArray

    logic = _segmentation_class("vtkSlicerSegmentationsModuleLogic")

    segment_ids = _segment_ids(lesions_node)
    if not segment_ids:
        raise BadInputError(f"the segmentation '{lesions_node.GetName()}' has no segments")
    ids = vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    color_tables_before = _node_ids(scene, "vtkMRMLColorTableNode")
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("lesions"))
    try:
        if not logic.ExportSegmentsToLabelmapNode(lesions_node, ids, labelmap_node, baseline_volume_node):
            raise BadInputError(f"could not export the segmentation '{lesions_node.GetName()}' to a labelmap")
        voxels = _labelmap_voxels(labelmap_node)
        geometry = volume_geometry(labelmap_node)
        write_volume_node(labelmap_node, path)
    finally:
        scene.RemoveNode(labelmap_node)
        for node_id in _node_ids(scene, "vtkMRMLColorTableNode") - color_tables_before:  # "<seg>_ColorTable"
            scene.RemoveNode(scene.GetNodeByID(node_id))
    segments = []
    for n, segment_id in enumerate(segment_ids):
        segment = lesions_node.GetSegmentation().GetSegment(segment_id)
        kji = np.argwhere(voxels == n + 1)
        centre = lps_to_ras(geometry.ijk_to_lps(kji.mean(axis=0)[::-1][None])[0]) if len(kji) else None
        segments.append(LesionSegment(n + 1, segment_id, segment.GetName(), tuple(segment.GetColor()), centre))
    return segments


def fill_followup_segmentation(scene, labelmap_path: str | Path, segments: list[LesionSegment],
                               segmentation_node=None, followup_volume_node=None, name: str = "Follow-up lesions"):
    """Load ``followup_lesions.nii.gz`` into ``segmentation_node`` (filled in place) or a new node;
    each lesion becomes the segment of ``segments`` with its ID, name and colour."""
    from vtkmodules.util import numpy_support

    logic = _segmentation_class("vtkSlicerSegmentationsModuleLogic")
    loaded = read_volume_file(scene, labelmap_path, "follow-up lesion labelmap")
    labels = _labelmap_voxels(loaded)
    binary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("lesion"))
    try:
        binary.CopyOrientation(loaded)
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        if followup_volume_node is not None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(followup_volume_node)
        representation = _segmentation_class("vtkSegmentationConverter").GetBinaryLabelmapRepresentationName()
        for segment in segments:
            image = loaded.GetImageData().NewInstance()
            image.DeepCopy(loaded.GetImageData())
            array = np.ascontiguousarray((labels == segment.label).astype(np.uint8)).ravel()
            image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array, deep=True))
            binary.SetAndObserveImageData(image)
            lesion = _segmentation_class("vtkSegment")()
            lesion.SetName(segment.name)
            lesion.SetColor(*segment.color)
            oriented = logic.CreateOrientedImageDataFromVolumeNode(binary)
            oriented.UnRegister(None)  # the caller owns the new image (as Slicer's own code releases it)
            lesion.AddRepresentation(representation, oriented)
            segmentation.AddSegment(lesion, segment.segment_id)
    finally:
        scene.RemoveNode(binary)
    return segmentation_node


def lesion_rows(lesions: list[TrackedLesion], segments: list[LesionSegment]) -> list[LesionRow]:
    """The rows of a ``track`` result's lesions, each with its segment (matched by label value)."""
    by_label = {segment.label: segment for segment in segments}
    return [
        LesionRow(
            by_label.get(lesion.label) or LesionSegment(lesion.label, str(lesion.label), str(lesion.label),
                                                       DEFAULT_COLOR, None),
            lesion.status, lesion.volume_baseline_ml, lesion.volume_followup_ml, lesion.volume_change_pct,
            lesion.diameter_baseline_mm, lesion.diameter_followup_mm, lesion.confidence,
            lps_to_ras(lesion.centre_lps_mm),
        )
        for lesion in lesions
    ]


def cell_text(value: float, digits: int) -> str:
    """A table cell: ``value`` with ``digits`` decimals, empty when not finite."""
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def fill_lesion_table(scene, rows: list[LesionRow], table_node=None, name: str = "Lesions"):
    """A table node (filled in place when given) with one row per lesion and :data:`TABLE_COLUMNS`."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table_node.RemoveAllColumns()
    for title in TABLE_COLUMNS:
        table_node.AddColumn().SetName(title)
    for row in rows:
        index = table_node.AddEmptyRow()
        cells = (row.segment.name, row.status, cell_text(row.volume_baseline_ml, 3),
                 cell_text(row.volume_followup_ml, 3), cell_text(row.volume_change_pct, 1),
                 cell_text(row.diameter_baseline_mm, 1), cell_text(row.diameter_followup_mm, 1),
                 cell_text(row.diameter_change_pct, 1), cell_text(row.confidence, 2))
        for column, text in enumerate(cells):
            table_node.SetCellText(index, column, text)
    return table_node


def jump_to_lesion(scene, row: LesionRow, baseline_view: str = FIXED_VIEW, followup_view: str = MOVING_VIEW) -> None:
    """Centre the baseline view on the lesion's baseline centre and the follow-up view on its match."""
    centre_views(scene, ((baseline_view, row.segment.baseline_ras), (followup_view, row.followup_ras)))
