"""The worker's parts in-process: the torch-free protocol (request lines, typed requests, events),
the job queue with cancel, and the Worker composing them over in-memory streams."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from MedDIFTLib.core import errors
from MedDIFTLib.core.environment import PACKAGE_PARENT
from MedDIFTLib.core.errors import ERROR_KINDS, BadInputError, BadRequestError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.options import (
    FieldLevel,
    FieldOptions,
    LesionOptions,
    MatchOptions,
    RunSettings,
    SeriesOptions,
)
from MedDIFTLib.worker import events
from MedDIFTLib.worker.jobs import Job, JobQueue
from MedDIFTLib.worker.protocol.requests import (
    REQUEST_TYPES,
    CancelRequest,
    FeaturesRequest,
    Limits,
    LoadRequest,
    MatchRequest,
    OverlaysRequest,
    ProbeRequest,
    RegisterRequest,
    RejectedRequest,
    ShutdownRequest,
    TrackRequest,
    TrackSeriesRequest,
    UnloadRequest,
    encode_request,
    parse_line,
    parse_request,
    type_of,
)
from MedDIFTLib.worker.protocol.results import (
    RESULT_TYPES,
    FeatureLevelSummary,
    FeaturesResult,
    LoadResult,
    MalformedResult,
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
    parse_result,
)
from MedDIFTLib.worker.stream import EventWriter, error_event, oversized, progress_event


def test_protocol_and_job_queue_import_neither_torch_nor_monai():
    code = (
        "import sys, MedDIFTLib.worker.protocol.requests, MedDIFTLib.worker.protocol.results, "
        "MedDIFTLib.worker.jobs; "
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert output.stdout.strip() == "[]"


# ---------------------------------------------------------------------- request lines


@pytest.mark.parametrize(
    ("line", "request_id", "words"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"type": "probe"}', None, "'id'"),
        (b'{"id": "n", "type": "probe", "x": NaN}', None, "malformed JSON"),
        (b'{"id": "t", "type": "frobnicate"}', "t", "unknown request type"),
    ],
)
def test_bad_lines_are_rejected_with_the_id_when_known(line, request_id, words):
    with pytest.raises(RejectedRequest) as raised:
        parse_line(line)
    assert raised.value.request_id == request_id and raised.value.kind == "bad_request"
    assert words in str(raised.value)


def test_a_line_gives_its_id_type_and_fields():
    assert parse_line(b'{"id": "a", "type": "unload", "volume_id": "v1"}\n') == ("a", "unload", {"volume_id": "v1"})


def test_an_oversized_line_is_answered_under_its_leading_id():
    assert oversized(b'{"id": "big", "type": "load", "path": "xxxx', 10).request_id == "big"
    assert oversized(b'{"type": "load", "id": "late"', 10).request_id is None
    assert "longer than 10 bytes" in str(oversized(b"{", 10))


# ---------------------------------------------------------------------- typed requests


def test_match_request_is_typed_with_defaults_from_the_options():
    request = parse_request(
        "match",
        {"fixed_id": "v1", "moving_id": "v2", "points_lps_mm": [[1, 2, 3], [4, 5, 6]], "backbone_options": None,
         "options": {"search_radius_mm": 12}, "extra": "ignored"},
    )
    assert isinstance(request, MatchRequest)
    assert request.points_lps_mm.shape == (2, 3) and request.points_lps_mm.dtype == float
    assert request.labels == ["1", "2"] and request.priors_lps_mm is None
    assert request.settings.match == MatchOptions(search_radius_mm=12.0)
    assert request.settings.backbone == RunSettings().backbone and request.settings.device == RunSettings().device
    assert request.settings.backbone_options == {}


def test_register_request_parses_field_options_and_optional_outputs():
    request = parse_request(
        "register",
        {"fixed_id": "v1", "moving_id": "v2", "out_transform": "f.nii.gz", "options": {"optimise_iterations": 0},
         "backbone": "mind", "device": "cpu"},
    )
    assert isinstance(request, RegisterRequest)
    assert (request.out_transform, request.out_inverse, request.out_warped, request.mask_id) == (
        "f.nii.gz", None, None, None)
    assert request.settings.field == FieldOptions(optimise_iterations=0)
    assert request.settings.device == "cpu"


MATCH = {"fixed_id": "v1", "moving_id": "v2", "points_lps_mm": [[0, 0, 0], [1, 1, 1]]}
BAD_REQUESTS = {
    "points not triples": (BadRequestError, "match", {"points_lps_mm": [[0, 1]]}, "points_lps_mm"),
    "points not a list": (BadRequestError, "match", {"points_lps_mm": "here"}, "points_lps_mm"),
    "too many points": (BadRequestError, "match", {"points_lps_mm": [[0, 0, 0]] * 3}, "limit of 2"),
    "priors do not pair": (BadRequestError, "match", {"priors_lps_mm": [[0, 0, 0]]}, "priors_lps_mm"),
    "labels do not pair": (BadRequestError, "match", {"labels": ["a"]}, "labels"),
    "missing volume id": (BadRequestError, "match", {"moving_id": None}, "moving_id"),
    "unknown option": (BadRequestError, "match", {"options": {"radius": 3}}, "radius"),
    "option of the wrong type": (BadRequestError, "match", {"options": {"subvoxel": "yes"}}, "subvoxel"),
    "option out of range": (BadInputError, "match", {"options": {"search_radius_mm": -1}}, "search_radius_mm"),
    "backbone not text": (BadRequestError, "match", {"backbone": 3}, "backbone"),
    "register without output": (BadRequestError, "register", {"out_transform": ""}, "out_transform"),
    "field option out of range": (BadInputError, "register", {"out_transform": "f.nii.gz",
                                                             "options": {"inverse_spacing_mm": 0}}, "inverse_spacing"),
    "load without path": (BadRequestError, "load", {}, "path"),
    "probe options not per backbone": (BadRequestError, "probe", {"backbone_options": {"maisi": 3}}, "backbone"),
    "cancel of a non-text id": (BadRequestError, "cancel", {"job_id": 7}, "job_id"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_fields_raise_the_error_kind_naming_the_field(case):
    error_class, request_type, changes, words = BAD_REQUESTS[case]
    with pytest.raises(BadInputError) as raised:
        parse_request(request_type, {**MATCH, **changes}, Limits(max_points=2))
    assert type(raised.value) is error_class
    assert words in str(raised.value)


def test_probe_options_default_per_backbone():
    assert parse_request("probe", {}) == ProbeRequest({})
    assert parse_request("probe", {"backbone_options": {"maisi": None}}) == ProbeRequest({"maisi": {}})


# ---------------------------------------------------------------------- encoded requests

RUN = RunSettings(backbone="maisi", backbone_options={"timestep": 20, "precision": "bf16"}, device="cpu")
FIELD = FieldOptions(levels=(FieldLevel(spacing_mm=5.0, search_radius_mm=9.0, step_mm=2.5),), optimise_iterations=0,
                     break_gradient=None)
# One request of each type, every field away from its default; then the optional fields left out.
ENCODED = [
    ProbeRequest({"maisi": {"timestep": 30}, "mind": {}}),
    LoadRequest("/data/fixed.nii.gz"),
    UnloadRequest("v3"),
    FeaturesRequest("v1", RUN),
    MatchRequest("v1", "v2", np.array([[1.5, -2.0, 3.25], [4.0, 5.0, 6.0]]), ["a", 7],
                 np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]),
                 dataclasses.replace(RUN, match=MatchOptions(search_radius_mm=12.0, mode="global",
                                                             level_weights=(1.0, 0.5), patch_radius=2))),
    RegisterRequest("v1", "v2", "t.nii.gz", "i.nii.gz", "w.nrrd", "v3", dataclasses.replace(RUN, field=FIELD)),
    OverlaysRequest("v1", "v2", "t.nrrd", "c.nrrd", "j.nrrd", "m.nrrd", FieldLevel(spacing_mm=8.0, step_mm=2.0),
                    RUN),
    TrackRequest("v1", "v2", "lesions.mrk.json", "out", LesionOptions(refine=False, growth_margin_mm=2.0),
                 dataclasses.replace(RUN, field=FIELD)),
    TrackSeriesRequest("v1", ("v2", "v3", "v4"), "lesions.nii.gz", "series", LesionOptions(refine=False),
                       SeriesOptions(route="chained", measurable_mm=8.0, max_targets=2),
                       dataclasses.replace(RUN, field=FIELD)),
    CancelRequest("r7"),
    ShutdownRequest(),
    ProbeRequest({}),
    MatchRequest("v1", "v2", np.zeros((0, 3)), [], None, RunSettings()),
    RegisterRequest("v1", "v2", "t.nii.gz", None, None, None, RunSettings()),
    OverlaysRequest("v1", "v2", None, "c.nrrd", None, None, FieldLevel(), RunSettings()),
    CancelRequest(None),
    # the inputs a client of meddift serve uploads: a field and a lesion labelmap, named by id
    OverlaysRequest("v1", "v2", None, "c.nrrd", "j.nrrd", None, FieldLevel(), RunSettings(), transform_id="f" * 40),
    TrackRequest("v1", "v2", None, "out", LesionOptions(), RunSettings(), lesions_id="v3"),
    TrackSeriesRequest("v1", ("v2",), None, "out", LesionOptions(), SeriesOptions(), RunSettings(), lesions_id="v3"),
]


@pytest.mark.parametrize("request_type, fields, message", [
    ("overlays", {"transform": "t.nrrd", "transform_id": "f" * 40}, "'transform' .* or 'transform_id'"),
    ("track", {"lesions": "l.nii.gz", "lesions_id": "v3"}, "'lesions' .* or 'lesions_id'"),
    ("track_series", {"followup_ids": ["v2"], "lesions": "l.nii.gz", "lesions_id": "v3"},
     "'lesions' .* or 'lesions_id'"),
    ("track", {}, "'lesions' must be the path"),
])
def test_an_input_is_given_by_path_or_by_id_never_both(request_type, fields, message):
    base = {"fixed_id": "v1", "moving_id": "v2", "out_confidence": "c.nrrd", "baseline_id": "v1", "followup_id": "v2",
            "out_dir": "out"}
    with pytest.raises(BadRequestError, match=message):
        parse_request(request_type, {**base, **fields})


def same_request(one, other) -> bool:
    """Dataclass equality, with arrays compared by shape and values."""
    if type(one) is not type(other):
        return False
    for field in dataclasses.fields(one):
        mine, theirs = getattr(one, field.name), getattr(other, field.name)
        if isinstance(mine, np.ndarray) or isinstance(theirs, np.ndarray):
            if not (isinstance(mine, np.ndarray) and isinstance(theirs, np.ndarray) and mine.shape == theirs.shape
                    and np.array_equal(mine, theirs)):
                return False
        elif mine != theirs:
            return False
    return True


@pytest.mark.parametrize("request_", ENCODED, ids=lambda request_: type(request_).__name__)
def test_an_encoded_request_parses_back_to_itself_through_a_json_line(request_):
    request_type, fields = encode_request(request_)
    line = json.dumps({"id": "r1", "type": request_type, **fields}, allow_nan=False).encode()
    request_id, parsed_type, parsed_fields = parse_line(line)
    assert (request_id, parsed_type) == ("r1", request_type)
    assert same_request(parse_request(parsed_type, parsed_fields), request_)
    assert None not in fields.values(), "optional fields left None are left out"


def test_every_request_type_has_an_encoding():
    assert sorted({encode_request(request_)[0] for request_ in ENCODED}) == sorted(REQUEST_TYPES)
    assert all(type_of(request_) == encode_request(request_)[0] for request_ in ENCODED)


def test_what_a_request_type_does_not_carry_is_refused_by_the_encoder():
    match = MatchRequest("v1", "v2", np.zeros((1, 3)), ["1"], None, RunSettings(field=FIELD))
    with pytest.raises(ValueError, match="settings.field"):
        encode_request(match)
    overlays = OverlaysRequest("v1", "v2", None, "c.nrrd", None, None, FieldLevel(),
                               RunSettings(match=MatchOptions(exact=True)))
    with pytest.raises(ValueError, match="settings.match"):
        encode_request(overlays)
    with pytest.raises(ValueError, match="upload"):
        encode_request(LoadRequest("ct", volume=object()))
    with pytest.raises(TypeError, match="not a request"):
        encode_request({"type": "load", "path": "ct.nii.gz"})


# ---------------------------------------------------------------------- results

NAN = float("nan")
GEOMETRY = Geometry.create((4, 5, 6), (0.7, 0.7, 2.5), (-10.0, 20.5, 3.0), (0, 1, 0, 1, 0, 0, 0, 0, -1))
ENCODED_RESULTS = [
    ("load", LoadResult("v1", "ct", GEOMETRY)),
    ("features", FeaturesResult(False, 1.25, 4096, [FeatureLevelSummary("mind", 12, (4, 5, 6)),
                                                    FeatureLevelSummary("up_blocks.3", 64, (2, 2, 3))])),
    ("features", FeaturesResult(True, NAN, 0, [])),
    ("match", MatchResult(["a", "b", "c"], np.array([[1.0, 2.0, 3.0], [NAN] * 3, [4.0, 5.0, 6.0]]),
                          np.array([0.9, NAN, 0.1]), np.array([0.8, NAN, 0.05]), np.array([0.5, NAN, 9.0]),
                          np.array([True, False, False]), seconds=2.5, match_seconds=0.5, features_cached=True)),
    ("match", MatchResult([], np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, bool),
                          seconds=0.1, match_seconds=0.0)),
    ("register", RegisterResult("t.nii.gz", None, "w.nrrd", {"min": 0.4, "fraction_folding": 0.0, "folding_voxels": 0},
                                {"mean": 3.5, "max": NAN}, {"register": 1.5, "total": 2.0})),
    ("overlays", OverlaysResult({"confidence": OverlaySummary("c.nrrd", 0.0, 1.0, 0.5),
                                 "jacobian": OverlaySummary("j.nrrd", -0.1, 1.5, NAN)})),
    ("overlays", OverlaysResult({})),
    ("track", TrackResult({"csv": "out/lesions.csv", "labelmap": "out/followup_lesions.nii.gz"},
                          [TrackedLesion(1, "A", "ok", [], 0.9, 0.5, 0.6, 20.0, 10.0, 11.0, (1.0, 2.0, 3.0)),
                           TrackedLesion(2, "B", "not_found", ["not_found"], NAN, 0.3, NAN, NAN, 8.0, NAN,
                                         (NAN, NAN, NAN))],
                          {"total": 3.0}, features_cached=False)),
    ("track", TrackResult({})),
    ("track_series", TrackSeriesResult(
        {"labelmap_1": "s/followup_1_lesions.nii.gz", "csv": "s/lesions.csv", "response": "s/response.csv"},
        ["base", "m06"],
        [SeriesVisit(1, "A", 0, "base", "ok", [], True, "", (1.0, 2.0, 3.0), NAN, NAN, 0.5, 0.0, 12.0, 9.0, 40.0,
                     NAN),
         SeriesVisit(1, "A", 1, "m06", "not_found;low_confidence", ["not_found", "low_confidence"], True, "direct",
                     (1.5, 2.0, 3.0), 0.2, 4.5, 0.0, -100.0, NAN, NAN, NAN, 2.5)],
        [TimePointResponse(0, "base", 12.0, 0.0, 12.0, 0.0, None), TimePointResponse(1, "m06", 0.0, -100.0, 12.0,
                                                                                    -100.0, "CR")],
        "auto", {"follow-up 1": 2.0, "total": 2.5}, features_cached=True)),
    ("track_series", TrackSeriesResult({})),
]


def same_value(one, other) -> bool:
    """Equal, NaN equal to NaN, arrays of the same shape element-wise, dataclasses field by field."""
    if dataclasses.is_dataclass(one) and type(one) is type(other):
        return all(same_value(getattr(one, field.name), getattr(other, field.name))
                   for field in dataclasses.fields(one))
    if isinstance(one, np.ndarray) or isinstance(other, np.ndarray):
        return (isinstance(one, np.ndarray) and isinstance(other, np.ndarray) and one.dtype == other.dtype
                and one.shape == other.shape and np.array_equal(one, other, equal_nan=one.dtype.kind == "f"))
    if isinstance(one, dict) and isinstance(other, dict):
        return one.keys() == other.keys() and all(same_value(one[key], other[key]) for key in one)
    if isinstance(one, (list, tuple)) and type(one) is type(other):
        return len(one) == len(other) and all(map(same_value, one, other))
    if isinstance(one, float) and isinstance(other, float) and np.isnan(one) and np.isnan(other):
        return True
    return type(one) is type(other) and one == other


@pytest.mark.parametrize(("request_type", "result"), ENCODED_RESULTS,
                         ids=[f"{kind}-{n}" for n, (kind, _) in enumerate(ENCODED_RESULTS)])
def test_an_encoded_result_parses_back_to_itself_through_json(request_type, result):
    payload = json.loads(json.dumps(encode_result(result), allow_nan=False))
    assert same_value(parse_result(request_type, payload), result)


def test_every_typed_result_has_an_encoding_and_the_others_have_none():
    assert sorted({kind for kind, _ in ENCODED_RESULTS}) == sorted(RESULT_TYPES)
    with pytest.raises(ValueError, match="no typed result"):
        parse_result("probe", {"version": "1"})
    with pytest.raises(TypeError, match="not a result"):
        encode_result({"volume_id": "v1"})


def test_a_match_without_reliable_flags_is_unreliable_and_null_points_are_missing():
    payload = encode_result(ENCODED_RESULTS[3][1])
    matches = parse_result("match", {**payload, "reliable": None, "points_lps_mm": [None, None, [1, 2, 3]]})
    assert not matches.reliable.any() and [matches.found(row) for row in range(3)] == [False, False, True]
    assert not parse_result("match", {**payload, "reliable": [None, "yes", True]}).reliable[:2].any()


def test_a_match_result_carries_the_engines_correspondences_both_ways():
    from MedDIFTLib.matching import Correspondences

    fixed = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    matches = Correspondences(fixed, np.array([[1.0, 1.0, 2.0], [NAN] * 3]), np.array([0.9, NAN]),
                              np.array([0.8, 0.0]), np.array([0.5, NAN]), np.array([True, False]))
    result = parse_result("match", encode_result(MatchResult.of([7, "b"], matches, seconds=2.0, match_seconds=1.5)))
    assert result.labels == ["7", "b"] and (result.seconds, result.match_seconds) == (2.0, 1.5)
    back = result.correspondences(fixed)
    for name in ("fixed_points_lps_mm", "points_lps_mm", "similarity", "confidence", "forward_backward_mm",
                 "reliable"):
        np.testing.assert_array_equal(getattr(back, name), getattr(matches, name))


def test_outputs_move_to_the_paths_given_by_name():
    register = ENCODED_RESULTS[5][1]
    assert register.output_files == {"transform": "t.nii.gz", "warped": "w.nrrd"}
    assert register.moved({"transform": "/here/t.nii.gz"}).output_files["transform"] == "/here/t.nii.gz"
    overlays = ENCODED_RESULTS[6][1].moved({"jacobian": "jacobian"})
    assert overlays.output_files == {"confidence": "c.nrrd", "jacobian": "jacobian"}
    track = ENCODED_RESULTS[8][1].moved({"csv": "csv"})
    assert track.output_files == {"csv": "csv", "labelmap": "out/followup_lesions.nii.gz"}
    series = ENCODED_RESULTS[10][1].moved({"labelmap_1": "/here/followup_1_lesions.nii.gz"})
    assert series.output_files == {"labelmap_1": "/here/followup_1_lesions.nii.gz", "csv": "s/lesions.csv",
                                   "response": "s/response.csv"}


MATCH_PAYLOAD = encode_result(ENCODED_RESULTS[3][1])
SERIES_PAYLOAD = encode_result(ENCODED_RESULTS[10][1])


@pytest.mark.parametrize(
    ("request_type", "payload", "words"),
    [
        ("match", ["not", "an", "object"], "malformed match result: not a JSON object"),
        ("match", {"labels": ["a"]}, "'points_lps_mm' must be a list"),
        ("match", {**MATCH_PAYLOAD, "points_lps_mm": MATCH_PAYLOAD["points_lps_mm"][:2]}, "2 points for 3 labels"),
        ("match", {**MATCH_PAYLOAD, "points_lps_mm": [[1, 2], None, None]}, "[l, p, s] points"),
        ("match", {**MATCH_PAYLOAD, "confidence": ["high", 0.1, 0.2]}, "'confidence' must be a list of numbers"),
        ("match", {**MATCH_PAYLOAD, "similarity": [0.1]}, "'similarity' has 1 values, not 3"),
        ("match", {**MATCH_PAYLOAD, "reliable": [True]}, "'reliable' must be a list of 3 flags"),
        ("match", {**MATCH_PAYLOAD, "features_cached": "yes"}, "'features_cached' must be true or false"),
        ("load", {"volume_id": "v1", "name": "ct", "geometry": {"shape_ijk": [4, 5]}}, "'shape_ijk' must be a list"),
        ("load", {"volume_id": "v1", "name": "ct"}, "malformed load result (geometry): not a JSON object"),
        ("features", {"cached": True, "seconds": 1, "bytes": 1.5, "levels": []}, "'bytes' must be a whole number"),
        ("register", {"transform": 3}, "'transform' must be a string"),
        ("register", {**encode_result(ENCODED_RESULTS[5][1]), "seconds": {"total": "1 s"}}, "'seconds' must be"),
        ("overlays", {"confidence": {"path": "c.nrrd", "min": "low", "max": 1, "mean": 0}}, "'min' must be"),
        ("track", {"files": {"csv": 3}}, "'files' must be an object of file paths"),
        ("track", {"files": {}, "lesions": [{"label": 1.5}], "seconds": {}, "features_cached": False},
         "track result (lesions[0]): 'label' must be a whole number"),
        ("track_series", {**SERIES_PAYLOAD, "scans": ["base", 2]}, "'scans' must be a list of strings"),
        ("track_series", {**SERIES_PAYLOAD, "visits": [{**SERIES_PAYLOAD["visits"][0], "target": 1}]},
         "track_series result (visits[0]): 'target' must be true or false"),
        ("track_series", {**SERIES_PAYLOAD, "responses": [{**SERIES_PAYLOAD["responses"][1], "category": 3}]},
         "track_series result (responses[0]): 'category' must be a string or null"),
    ],
)
def test_a_malformed_result_is_a_worker_error_naming_the_field(request_type, payload, words):
    with pytest.raises(MalformedResult, match=re.escape(words)) as raised:
        parse_result(request_type, payload)
    assert raised.value.kind == "internal" and str(raised.value).startswith("the worker returned a malformed")


# ---------------------------------------------------------------------- events


def test_error_kinds_are_those_of_the_library_errors_and_of_the_client():
    kinds = {value.kind for value in vars(errors).values() if isinstance(value, type) and
             issubclass(value, errors.MedDIFTError)}
    assert set(ERROR_KINDS) == kinds == set(events.ERROR_CLASSES)


def test_events_read_back_as_the_clients_typed_events():
    progress = events.parse_event(progress_event("j", "match", 1.5, "done"))
    assert progress == events.Progress("j", "match", 1.0, "done")
    assert events.parse_event(error_event("j", "cancelled", "stop")) == events.Error("j", "cancelled", "stop")


def test_event_writer_writes_json_lines_and_notices_a_closed_stream():
    stream = io.BytesIO()
    writer = EventWriter(stream)
    assert writer.emit({"id": "a", "value": np.float64(np.nan)})
    assert json.loads(stream.getvalue()) == {"id": "a", "value": None}
    stream.close()
    assert not writer.emit({"id": "b"}) and writer.broken


# ---------------------------------------------------------------------- jobs


def _job(request_id: str | None, request_type: str = "unload") -> Job:
    return Job(request_id, request_type, UnloadRequest("v1"))


def test_queue_refuses_a_pending_id_and_withdraws_a_cancelled_queued_job():
    jobs = JobQueue()
    first, second = _job("a"), _job("b")
    assert jobs.submit(first) and jobs.submit(second) and not jobs.submit(_job("a"))
    assert jobs.cancel("b") is second and second.withdrawn and second.cancel_event.is_set()
    assert jobs.next(0.1) is first and jobs.start(first)
    assert jobs.next(0.1) is second and not jobs.start(second)
    assert jobs.cancel(None) is first and first.cancel_event.is_set() and not first.withdrawn
    jobs.finish(first)
    assert jobs.running is None and jobs.cancel(None) is None
    assert jobs.submit(_job("a"))


def test_cancel_skips_shutdown_and_drain_returns_the_jobs_left():
    jobs = JobQueue()
    shutdown = Job("s", "shutdown", ShutdownRequest())
    later = _job("later")
    assert jobs.submit(shutdown) and jobs.submit(later)
    assert jobs.cancel("s") is None
    assert jobs.drain(shutdown) == [later]
    assert jobs.cancel(None) is None


# ---------------------------------------------------------------------- the composed worker


def _run(lines: list[bytes]) -> list[dict]:
    from MedDIFTLib.worker.server import Worker

    stream = io.BytesIO()
    worker = Worker(EventWriter(stream), cache_bytes=0)
    for line in lines:
        worker.handle_line(line)
    assert worker.serve() == 0
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_worker_answers_bad_requests_at_once_and_runs_jobs_in_order():
    emitted = _run([
        b'{"id": "u", "type": "unload", "volume_id": "v9"}',
        b'{"id": "m", "type": "match", "fixed_id": "v1"}',
        b'{"id": "u", "type": "probe"}',
        b'{"id": "x", "type": "features", "volume_id": "v1", "device": "cpu"}',
        b'{"id": "s", "type": "shutdown"}',
    ])
    summary = [(e["id"], e["event"], e.get("kind")) for e in emitted]
    assert summary == [
        ("m", "error", "bad_request"),
        ("u", "error", "bad_request"),
        ("u", "result", None),
        ("x", "error", "bad_request"),
        ("s", "result", None),
    ]
    assert emitted[2]["result"] == {"unloaded": False}
    assert "load the volume first" in emitted[3]["message"]


def test_a_typed_request_handed_in_is_served_as_its_line_would_be():
    """``meddift serve`` hands typed requests to its sessions' workers (Worker.accept), not lines."""
    from MedDIFTLib.worker.server import Worker

    stream = io.BytesIO()
    worker = Worker(EventWriter(stream), cache_bytes=0)
    worker.accept("u", "unload", UnloadRequest("v9"))
    worker.accept("c", "cancel", CancelRequest("u"))
    worker.accept("v", "unload", UnloadRequest("v9"))
    worker.accept("v", "unload", UnloadRequest("v8"))
    worker.accept("s", "shutdown", ShutdownRequest())
    assert worker.serve() == 0
    handed_in = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert handed_in == _run([
        b'{"id": "u", "type": "unload", "volume_id": "v9"}',
        b'{"id": "c", "type": "cancel", "job_id": "u"}',
        b'{"id": "v", "type": "unload", "volume_id": "v9"}',
        b'{"id": "v", "type": "unload", "volume_id": "v8"}',
        b'{"id": "s", "type": "shutdown"}',
    ])
    assert [(e["id"], e["event"], e.get("kind")) for e in handed_in] == [
        ("c", "result", None), ("u", "error", "cancelled"), ("v", "error", "bad_request"),
        ("v", "result", None), ("s", "result", None),
    ]


def test_device_inside_backbone_options_is_refused():
    from MedDIFTLib.worker.state import WorkerState

    state = WorkerState(0, Limits(), log=lambda level, message: None)
    with pytest.raises(BadRequestError, match="'device' field"):
        state.featurizer(RunSettings(backbone_options={"device": "cpu"}), "cpu")


def test_a_request_that_breaks_the_parser_is_an_internal_error_and_serving_goes_on(monkeypatch):
    from MedDIFTLib.worker import server

    def broken(request_type, fields, limits):
        raise KeyError("no such key")

    stream = io.BytesIO()
    worker = server.Worker(EventWriter(stream), cache_bytes=0)
    with monkeypatch.context() as patch:
        patch.setattr(server, "parse_request", broken)
        worker.handle_line(b'{"id": "a", "type": "probe"}')
    worker.read_requests(io.BytesIO(b'{"id": "u", "type": "unload", "volume_id": "v1"}\n'))
    assert worker.serve() == 0
    emitted = [json.loads(line) for line in stream.getvalue().splitlines()]
    summary = [(e["id"], e["event"], e.get("kind")) for e in emitted]
    assert summary == [("a", "error", "internal"), ("u", "result", None)]
    assert "KeyError" in emitted[0]["message"]


def test_every_queued_request_type_has_one_handler():
    from MedDIFTLib.worker.handlers import HANDLERS

    assert set(HANDLERS) == set(REQUEST_TYPES) - {"cancel", "shutdown"}


@pytest.mark.parametrize(
    ("error", "device", "words"),
    [
        (MemoryError(), "cpu", "out of memory on the CPU"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "cpu", "--cache-bytes"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "cuda:1", "out of GPU memory on cuda:1"),
    ],
)
def test_running_out_of_memory_is_its_own_error_kind_with_advice(monkeypatch, error, device, words):
    from MedDIFTLib.worker import handlers, server

    def exhausted(state, request, progress):
        raise error

    monkeypatch.setitem(handlers.HANDLERS, "features", exhausted)
    monkeypatch.setattr(server, "device_name", lambda name: device)
    stream = io.BytesIO()
    worker = server.Worker(EventWriter(stream), cache_bytes=0)
    worker.handle_line(b'{"id": "f", "type": "features", "volume_id": "v1", "device": "cpu"}')
    worker.handle_line(b'{"id": "s", "type": "shutdown"}')
    assert worker.serve() == 0
    final = json.loads(stream.getvalue().splitlines()[0])
    assert (final["id"], final["kind"]) == ("f", "out_of_memory")
    assert final["message"].startswith("features: ") and words in final["message"]



def _serve_with_fill_log(monkeypatch, pause_s: float) -> tuple:
    """A worker serving on a thread with ``FILL_PAUSE_S = pause_s``; its fill steps are logged (never
    done) with the count of events written before each."""
    import threading

    from MedDIFTLib.worker import server

    monkeypatch.setattr(server, "FILL_PAUSE_S", pause_s)
    stream = io.BytesIO()
    worker = server.Worker(EventWriter(stream), cache_bytes=0)
    fills = []
    monkeypatch.setattr(worker.state, "fill_behind", lambda: fills.append(len(stream.getvalue().splitlines())) or True)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    return worker, stream, fills, thread


def _wait_until(done) -> None:
    import time

    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.001)


MATCH_LINE = b'{"id": "%s", "type": "match", "fixed_id": "v1", "moving_id": "v2", "points_lps_mm": [[0, 0, 0]]}'


def test_a_match_sent_right_after_a_match_result_does_not_wait_for_filling_behind(monkeypatch):
    worker, stream, fills, thread = _serve_with_fill_log(monkeypatch, pause_s=30.0)
    worker.handle_line(MATCH_LINE % b"a")
    _wait_until(lambda: len(stream.getvalue().splitlines()) == 1)
    worker.handle_line(MATCH_LINE % b"b")  # the next point, sent on the result
    _wait_until(lambda: len(stream.getvalue().splitlines()) == 2)
    worker.jobs.stop()
    thread.join(30)
    assert not thread.is_alive() and fills == []
    assert [json.loads(line)["id"] for line in stream.getvalue().splitlines()] == ["a", "b"]


@pytest.mark.parametrize("first", [MATCH_LINE % b"a", b'{"id": "a", "type": "probe"}'], ids=["match", "probe"])
def test_the_idle_worker_fills_behind_after_a_match_pause_or_at_once(monkeypatch, first):
    worker, stream, fills, thread = _serve_with_fill_log(monkeypatch, pause_s=0.01 if b"match" in first else 30.0)
    worker.handle_line(first)
    _wait_until(lambda: fills)  # a probe (polling, e.g. for the fill) never delays it
    worker.jobs.stop()
    thread.join(30)
    assert not thread.is_alive() and fills[0] == 1  # after the job's result
