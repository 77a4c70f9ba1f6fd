"""One function per request type: ``handler(state, request, progress) -> result``.

Each takes the worker's :class:`~.state.WorkerState`, its typed request (:mod:`.protocol.requests`)
and a progress callback (which raises ``CancelledError`` once the job is cancelled), and returns the
JSON-ready result: its typed result (:mod:`.protocol.results`) as ``encode_result`` writes it, or for
``probe`` and ``unload`` a plain object. Errors are raised as
:class:`MedDIFTLib.core.errors.MedDIFTError`. Coordinates are LPS mm; geometry is reported in
SimpleITK order (``shape_ijk``, ``spacing_mm``, ``origin_lps_mm``, row-major ``direction``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..core.budget import estimate_match, estimate_register
from ..core.io import Volume, write_volume
from ..core.io.volumes import check_overlap, check_volume_output
from ..core.options import FieldOptions
from ..core.progress import ProgressFn, scaled
from ..features import FeaturePyramid, available_backbones, backbone_spec
from ..field import read_field, register_and_write
from ..field.overlays import CONFIDENCE, JACOBIAN, MAGNITUDE, qa_overlays
from ..lesions import series as lesion_series
from ..lesions.inputs import Lesions, lesions_from_labelmap, read_lesions
from ..lesions.outputs import check_outputs, write_outputs
from ..lesions.series_outputs import check_series_outputs, write_series_outputs
from ..lesions.track import track_lesions
from ..matching import match_points
from .protocol.requests import (
    FeaturesRequest,
    LoadRequest,
    MatchRequest,
    OverlaysRequest,
    ProbeRequest,
    RegisterRequest,
    TrackRequest,
    TrackSeriesRequest,
    UnloadRequest,
)
from .protocol.results import (
    FeatureLevelSummary,
    FeaturesResult,
    LoadResult,
    MatchResult,
    OverlaysResult,
    OverlaySummary,
    RegisterResult,
    SeriesVisit,
    TimePointResponse,
    TrackedLesion,
    TrackResult,
    TrackSeriesResult,
    encode_result,
)
from .state import WorkerState, device_name

Handler = Callable[[WorkerState, Any, ProgressFn], dict[str, Any]]


def probe(state: WorkerState, request: ProbeRequest, progress: ProgressFn) -> dict[str, Any]:
    """Versions, devices with memory, backbones with their weights, cache, volumes and limits."""
    import monai

    return {
        "version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "simpleitk": sitk.Version.VersionString(),
        "numpy": np.__version__,
        "pid": os.getpid(),
        "cuda_available": torch.cuda.is_available(),
        "default_device": device_name("auto"),
        "devices": _devices(),
        "backbones": [_backbone_status(name, request.backbone_options.get(name, {})) for name in available_backbones()],
        "cache": state.cache.describe(),
        "volumes": [
            {"volume_id": volume_id, "name": volume.name, "shape_ijk": list(volume.geometry.shape_ijk)}
            for volume_id, volume in state.volumes.items()
        ],
        "limits": {"max_request_bytes": state.limits.max_request_bytes, "max_points": state.limits.max_points},
    }


def _devices() -> list[dict[str, Any]]:
    """The CPU (RAM, threads) and each CUDA device (memory), total and free bytes."""
    total, available = _system_memory()
    found = [
        {
            "name": "cpu",
            "label": platform.processor() or platform.machine(),
            "memory_bytes": total,
            "free_bytes": available,
            "threads": torch.get_num_threads(),
        }
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total_gpu = torch.cuda.mem_get_info(index)
            found.append(
                {
                    "name": f"cuda:{index}",
                    "label": torch.cuda.get_device_name(index),
                    "memory_bytes": int(total_gpu),
                    "free_bytes": int(free),
                }
            )
    return found


def _system_memory() -> tuple[int | None, int | None]:
    """Total and available RAM in bytes (None where it cannot be read)."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except ImportError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None, None


def _backbone_status(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Whether backbone ``name`` can be loaded and whether its weights are on this machine."""
    spec = backbone_spec(name)
    try:
        spec.featurizer_class()
    except (ImportError, AttributeError) as error:
        return {"name": name, "available": False, "weights_present": False, "message": f"cannot be loaded: {error}"}
    try:
        present, message = spec.weights_status(**options)
    except Exception as error:
        present, message = False, str(error)
    return {"name": name, "available": True, "weights_present": bool(present), "message": str(message)}


def load(state: WorkerState, request: LoadRequest, progress: ProgressFn) -> dict[str, Any]:
    """Read a volume; returns its id, name and geometry."""
    progress("load", 0.0, f"reading {request.path}")
    volume_id = state.load(request.path) if request.volume is None else state.add(request.volume)
    volume = state.volumes[volume_id]
    progress("load", 1.0, f"loaded {volume.name}")
    return encode_result(LoadResult(volume_id, volume.name, volume.geometry))


def unload(state: WorkerState, request: UnloadRequest, progress: ProgressFn) -> dict[str, Any]:
    return {"unloaded": state.unload(request.volume_id)}


def features(state: WorkerState, request: FeaturesRequest, progress: ProgressFn) -> dict[str, Any]:
    """Extract (or find in the cache) one volume's features; describes their levels."""
    volume = state.volume(request.volume_id, "volume_id")
    found = state.features(request.settings, volume, device_name(request.settings.device), progress)
    levels = [FeatureLevelSummary(level.name, level.channels, level.geometry.shape_ijk)
              for level in found.pyramid.levels]
    return encode_result(FeaturesResult(found.cached, found.seconds, found.pyramid.nbytes, levels))


def match(state: WorkerState, request: MatchRequest, progress: ProgressFn) -> dict[str, Any]:
    """Match the fixed points into the moving volume; labels pair inputs with outputs."""
    started = time.perf_counter()
    settings = request.settings
    device = device_name(settings.device)
    state.check_memory(estimate_match(state.volume(request.fixed_id, "fixed_id").geometry,
                                      state.volume(request.moving_id, "moving_id").geometry,
                                      settings.match.memory_budget_mb))
    pair = state.pair(settings, request.fixed_id, request.moving_id, device, progress, regions=True)
    progress("match", 0.0, f"matching {len(request.points_lps_mm)} points")
    match_started = time.perf_counter()
    result = match_points(
        pair.fixed_pyramid, pair.moving_pyramid, request.points_lps_mm, request.priors_lps_mm, settings.match, progress
    )
    match_seconds = time.perf_counter() - match_started
    return encode_result(MatchResult.of(request.labels, result, seconds=time.perf_counter() - started,
                                        match_seconds=match_seconds, features_cached=pair.cached))


def register(state: WorkerState, request: RegisterRequest, progress: ProgressFn) -> dict[str, Any]:
    """Dense registration written to files (see :func:`MedDIFTLib.field.register_and_write`)."""
    settings = request.settings
    mask = state.volume(request.mask_id, "mask_id") if request.mask_id is not None else None
    state.check_memory(estimate_register(state.volume(request.fixed_id, "fixed_id").geometry,
                                         state.volume(request.moving_id, "moving_id").geometry, settings.field))
    pair = state.pair(settings, request.fixed_id, request.moving_id, device_name(settings.device), progress)
    progress("register", 0.0, "registering")
    summary = register_and_write(
        pair.fixed,
        pair.moving,
        pair.fixed_pyramid,
        pair.moving_pyramid,
        out_transform=request.out_transform,
        out_inverse=request.out_inverse,
        out_warped=request.out_warped,
        options=settings.field,
        progress=progress,
        mask=mask,
    )
    return encode_result(RegisterResult(**summary))


def overlays(state: WorkerState, request: OverlaysRequest, progress: ProgressFn) -> dict[str, Any]:
    """QA overlays on the fixed grid (:func:`MedDIFTLib.field.overlays.qa_overlays`): lattice match
    confidence, and from the field its Jacobian determinant and displacement magnitude (mm), written
    where the request asks. Every path is checked before any work."""
    outputs = {
        name: check_volume_output(path)
        for name, path in (
            (CONFIDENCE, request.out_confidence),
            (JACOBIAN, request.out_jacobian),
            (MAGNITUDE, request.out_magnitude),
        )
        if path is not None
    }
    settings = request.settings
    lattice_only = FieldOptions(levels=(request.lattice,), optimise_iterations=0)
    state.check_memory(estimate_register(state.volume(request.fixed_id, "fixed_id").geometry,
                                         state.volume(request.moving_id, "moving_id").geometry, lattice_only,
                                         what="overlays"))
    pair = state.pair(settings, request.fixed_id, request.moving_id, device_name(settings.device), progress)
    if request.transform is not None:
        field = read_field(request.transform)
    else:
        field = None if request.transform_id is None else state.field(request.transform_id)
    values = qa_overlays(pair.fixed_pyramid, pair.moving_pyramid, request.lattice, field, progress)
    progress("overlays", 0.9, "writing the overlays")
    geometry = pair.fixed_pyramid.image_geometry
    written = {}
    for name, path in outputs.items():
        voxels = values[name]
        write_volume(Volume(voxels, geometry, name=name), path)
        written[name] = OverlaySummary(str(path), float(voxels.min()), float(voxels.max()), float(voxels.mean()))
    progress("overlays", 1.0, "done")
    return encode_result(OverlaysResult(written))


def track(state: WorkerState, request: TrackRequest, progress: ProgressFn) -> dict[str, Any]:
    """Track the baseline lesions into the follow-up and write the files of ``meddift track``
    (:mod:`MedDIFTLib.lesions.outputs`); the volumes' feature pyramids come from the cache. The output
    folder and the lesions are checked before any work."""
    check_outputs(request.out_dir)
    settings = request.settings
    baseline = state.volume(request.baseline_id, "baseline_id")
    followup = state.volume(request.followup_id, "followup_id")
    check_overlap(baseline, followup)
    state.check_memory(estimate_register(followup.geometry, baseline.geometry, settings.field, what="track"))
    lesions = _lesions(state, request, baseline, progress)
    pair = state.pair(settings, request.baseline_id, request.followup_id, device_name(settings.device),
                      scaled(progress, 0.0, 0.2), regions=request.lesion_options.field_margin_mm > 0)
    result = track_lesions(
        pair.fixed,
        pair.moving,
        lesions,
        pair.fixed_pyramid,
        pair.moving_pyramid,
        request.lesion_options,
        settings.field,
        progress=scaled(progress, 0.2, 0.95),
    )
    progress("track", 0.95, "writing the lesion files")
    paths = write_outputs(result, baseline, followup, request.out_dir)
    progress("track", 1.0, "done")
    lesions = [
        TrackedLesion(
            label=int(lesion.label),
            name=lesion.name,
            status=lesion.status,
            flags=list(lesion.flags),
            confidence=lesion.confidence,
            volume_baseline_ml=lesion.baseline.volume_ml,
            volume_followup_ml=lesion.followup.volume_ml,
            volume_change_pct=lesion.volume_change_pct,
            diameter_baseline_mm=lesion.baseline.long_mm,
            diameter_followup_mm=lesion.followup.long_mm,
            centre_lps_mm=tuple(float(value) for value in lesion.centre_lps_mm),
        )
        for lesion in result.lesions
    ]
    files = {key: str(path) for key, path in paths.items()}
    return encode_result(TrackResult(files, lesions, result.seconds, pair.cached))


def track_series(state: WorkerState, request: TrackSeriesRequest, progress: ProgressFn) -> dict[str, Any]:
    """Follow the baseline lesions through the follow-ups (:func:`MedDIFTLib.lesions.series.track_series`)
    and write the files of ``meddift track`` over a series (:mod:`MedDIFTLib.lesions.series_outputs`).
    Each scan's features come from the cache, extracted once. The output folder, the volumes (ids,
    modality, overlap), the memory of the largest pair and the lesions are checked before any work; a
    cancel stops the job at its next progress report, between pairs or within one."""
    check_series_outputs(request.out_dir, len(request.followup_ids))
    settings = request.settings
    device = device_name(settings.device)
    baseline = state.volume(request.baseline_id, "baseline_id")
    followups = [state.volume(volume_id, f"followup_ids[{index}]") for index, volume_id in
                 enumerate(request.followup_ids)]
    lesion_series.check_series(baseline, followups)
    scans = [baseline, *followups]
    state.check_memory(lesion_series.series_estimate(scans, request.series_options.route, settings.field))
    lesions = _lesions(state, request, baseline, progress)
    cached = []

    def extract(volume: Volume, step: ProgressFn) -> FeaturePyramid:
        found = state.features(settings, volume, device, step)
        cached.append(found.cached)
        return state.on_device(found, device)

    result = lesion_series.track_series(baseline, followups, lesions, extract, request.lesion_options,
                                        request.series_options, settings.field, scaled(progress, 0.0, 0.95))
    progress("track", 0.95, "writing the series files")
    paths = write_series_outputs(result, scans, request.out_dir)
    progress("track", 1.0, "done")
    files = {key: str(path) for key, path in paths.items()}
    return encode_result(TrackSeriesResult(files, result.scan_names, _series_visits(result),
                                           _series_responses(result), result.route, result.seconds, all(cached)))


def _lesions(state: WorkerState, request: TrackRequest | TrackSeriesRequest, baseline: Volume,
             progress: ProgressFn) -> Lesions:
    """The baseline lesions of a track request: its ``lesions`` file, or the loaded labelmap ``lesions_id``."""
    if request.lesions_id is not None:
        return lesions_from_labelmap(state.volume(request.lesions_id, "lesions_id"), baseline)
    progress("track", 0.0, f"reading the lesions {os.path.basename(request.lesions)}")
    return read_lesions(request.lesions, baseline)


def _series_visits(result: lesion_series.SeriesResult) -> list[SeriesVisit]:
    """The visits of ``result``, lesion by lesion, each through time (the rows of its ``lesions.csv``)."""
    visits = []
    for label in [visit.label for visit in result.visits[0]]:
        for visit in result.timeline(label):
            measured = visit.measurement
            visits.append(SeriesVisit(
                label=int(visit.label), name=visit.name, time_point=visit.time_point,
                scan=result.scan_names[visit.time_point], status=visit.status, flags=list(visit.flags),
                target=label in result.targets, route=visit.route,
                centre_lps_mm=tuple(float(value) for value in visit.centre_lps_mm), confidence=visit.confidence,
                forward_backward_mm=visit.forward_backward_mm, volume_ml=measured.volume_ml,
                volume_change_pct=result.volume_change_pct(visit), diameter_long_mm=measured.long_mm,
                diameter_short_mm=measured.short_mm, mean_hu=measured.mean_hu,
                routes_apart_mm=visit.routes_apart_mm))
    return visits


def _series_responses(result: lesion_series.SeriesResult) -> list[TimePointResponse]:
    """The response of ``result`` per time point (the rows of its ``response.csv``)."""
    return [TimePointResponse(response.time_point, result.scan_names[response.time_point], response.sld_mm,
                              response.change_from_baseline_pct, response.nadir_mm, response.change_from_nadir_pct,
                              response.category) for response in result.responses]


HANDLERS: dict[str, Handler] = {
    "probe": probe,
    "load": load,
    "unload": unload,
    "features": features,
    "match": match,
    "register": register,
    "overlays": overlays,
    "track": track,
    "track_series": track_series,
}
