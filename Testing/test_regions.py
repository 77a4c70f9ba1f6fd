"""Feature storage: MIND filled where it is read (boxes equal the whole-volume extraction, and matching
on region-filled pyramids equals matching on complete ones: the worker's interactive path), and kept
at half precision (sampled without converting whole levels; matches agree with float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume
from MedDIFTLib.core.options import MatchOptions, RunSettings
from MedDIFTLib.features.mind import MindFeaturizer, mind_ssc
from MedDIFTLib.features.regions import BLOCK, MIN_BLOCK, READ_AHEAD, RegionFiller
from MedDIFTLib.grid.sampling import sample, sample_stored
from MedDIFTLib.matching import match_points
from MedDIFTLib.worker.protocol.requests import Limits
from MedDIFTLib.worker.state import WorkerState


def _textured_volume(shape_kji: tuple[int, int, int], seed: int = 0) -> Volume:
    """Smooth random texture in HU on an anisotropic grid (sizes not multiples of the MIND scales)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    voxels = ndimage.gaussian_filter(rng.normal(size=shape_kji), 1.5) * 4000.0 - 300.0
    geometry = Geometry.create(shape_kji[::-1], (1.2, 1.0, 2.0), (-40.0, 10.0, 5.0))
    return Volume(voxels.astype(np.float32), geometry, "texture")


def _shifted(volume: Volume, shift_kji: tuple[int, int, int]) -> Volume:
    return dataclasses.replace(volume, voxels=np.roll(volume.voxels, shift_kji, axis=(0, 1, 2)).copy(), name="moved")


def test_region_filler_computes_only_missing_blocks():
    calls = []

    def compute(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
        calls.append((tuple(lo_kji), tuple(hi_kji)))
        k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo_kji, hi_kji)], indexing="ij")
        return torch.from_numpy(np.stack([k, j, i]).astype(np.float32))

    shape = (5 * BLOCK, 4 * BLOCK, 9)
    features = torch.full((3, *shape), -1.0)
    filler = RegionFiller(compute, shape)
    filler.ensure(features, np.array([2 * BLOCK + 1, 1, 1]), np.array([2 * BLOCK + 3, 3, 3]))
    assert READ_AHEAD == 1  # the figures below: the request's block and one block around it, clipped
    assert calls == [((BLOCK, 0, 0), (4 * BLOCK, 2 * BLOCK, 9))]
    filler.ensure(features, np.array([BLOCK, 0, 0]), np.array([4 * BLOCK, 2 * BLOCK, 9]))
    assert len(calls) == 1
    filler.ensure(features, np.array([3 * BLOCK, 2, 0]), np.array([4 * BLOCK + 1, 3, 99]))
    # the bounding box of the missing blocks (k block 4), grown by READ_AHEAD
    assert calls[1] == ((3 * BLOCK, 0, 0), (5 * BLOCK, 2 * BLOCK, 9))
    assert not filler.done and 0 < filler.filled_share < 1
    filler.fill(features)
    assert filler.done and torch.equal(features, compute(np.zeros(3, int), np.asarray(shape)))


def test_a_filler_around_filled_blocks_computes_a_wider_box_without_them():
    """A wide box asked for around a narrower filled one is computed in parts that skip it; when the
    filled blocks inside do not form one box, the missing box is computed whole."""
    calls = []

    def compute(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
        calls.append((tuple(int(n) for n in lo_kji), tuple(int(n) for n in hi_kji)))
        k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo_kji, hi_kji)], indexing="ij")
        return torch.from_numpy(np.stack([k, j, i]).astype(np.float32))

    shape = (6 * BLOCK, 6 * BLOCK, 6 * BLOCK)
    features = torch.full((3, *shape), -1.0)
    filler = RegionFiller(compute, shape, block=BLOCK, around_filled=True)
    filler.ensure(features, np.full(3, 2 * BLOCK), np.full(3, 4 * BLOCK), ahead=0)
    filler.ensure(features, np.full(3, BLOCK), np.full(3, 5 * BLOCK), ahead=0)
    computed = np.zeros(shape, int)
    for lo, hi in calls:
        computed[tuple(slice(a, b) for a, b in zip(lo, hi))] += 1
    wide = (slice(BLOCK, 5 * BLOCK),) * 3
    assert len(calls) == 7 and bool((computed[wide] == 1).all()) and computed.sum() == (4 * BLOCK) ** 3
    filler.ensure(features, np.zeros(3, int), np.array([BLOCK, BLOCK, 6 * BLOCK]), ahead=0)
    filler.ensure(features, np.zeros(3, int), np.full(3, 6 * BLOCK), ahead=0)  # filled: an L, not a box
    assert calls[-1] == ((0, 0, 0), shape)
    assert filler.done and torch.equal(features, compute(np.zeros(3, int), np.asarray(shape)))


def test_fill_some_steps_through_the_level_in_raster_order_within_its_budget():
    calls = []

    def compute(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
        calls.append((tuple(int(n) for n in lo_kji), tuple(int(n) for n in hi_kji)))
        return torch.ones((1, *(np.asarray(hi_kji) - np.asarray(lo_kji))))

    shape = (2 * BLOCK, 3 * BLOCK, 20)
    features = torch.zeros((1, *shape))
    filler = RegionFiller(compute, shape)
    filler.ensure(features, np.array([0, 0, 0]), np.array([1, 1, 1]), ahead=0)  # one block already there
    budget = 2 * BLOCK * BLOCK * 20  # two rows of blocks
    steps = 0
    while not filler.done:
        filler.fill_some(features, budget)
        steps += 1
    b = BLOCK
    assert calls[1:] == [((0, 0, 0), (b, 2 * b, 20)), ((0, 2 * b, 0), (b, 3 * b, 20)),
                         ((b, 0, 0), (2 * b, 2 * b, 20)), ((b, 2 * b, 0), (2 * b, 3 * b, 20))]
    assert steps == 4 and bool(features.eq(1).all())
    filler.fill_some(features, budget)
    assert len(calls) == 5


def test_worker_state_fills_cached_region_pyramids_behind_step_by_step():
    state = WorkerState(2**30, Limits(), lambda level, message: None)
    volume = _textured_volume((20, 24, 22))
    first = state.features(RunSettings(backbone="mind"), volume, "cpu", lambda *args: None, regions=True)
    steps = 0
    while state.fill_behind(voxels=BLOCK**3):
        steps += 1
        assert steps < 1000
    assert steps > 1 and first.pyramid.complete and not state.fill_behind()
    for level, expected in zip(first.pyramid.levels, MindFeaturizer().extract(volume).levels):
        assert torch.equal(level.features, expected.features)


@pytest.mark.parametrize("scales", [(1, 2, 4), (3,)])
def test_mind_boxes_equal_the_whole_volume(scales):
    volume = _textured_volume((23, 30, 26))
    featurizer = MindFeaturizer(scales=scales)
    whole = featurizer.extract(volume)
    regions = featurizer.extract_regions(volume)
    assert not regions.complete and regions.config == whole.config
    rng = np.random.default_rng(1)
    for level, reference in zip(regions.levels, whole.levels):
        shape = np.asarray(level.geometry.shape_ijk)
        lo = rng.integers(-3, shape, (12, 3))
        hi = lo + rng.integers(1, 9, (12, 3))
        level.ensure_boxes(lo, hi)
        for a, b in zip(np.clip(lo, 0, shape), np.clip(hi, 0, shape)):
            box = (slice(None), slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0]))
            assert torch.equal(level.features[box], reference.features[box])
    regions.fill()
    assert regions.complete
    for level, reference in zip(regions.levels, whole.levels):
        assert torch.equal(level.features, reference.features)


def test_level_readers_fill_what_they_read_and_equal_a_complete_level():
    volume = _textured_volume((23, 30, 26))
    featurizer = MindFeaturizer()
    whole = featurizer.extract(volume).levels[0]
    level = featurizer.extract_regions(volume).levels[0]
    rng = np.random.default_rng(2)
    ijk = torch.as_tensor(rng.uniform(-1, 4, (3, 4, 3)), dtype=torch.float32)  # a corner: reads stay local
    taps = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]])
    assert torch.equal(level.samples(ijk, taps), whole.samples(ijk, taps))
    assert torch.equal(level.samples(ijk), whole.samples(ijk))
    start = rng.integers(-2, 3, (5, 3))
    assert torch.equal(level.boxes(start, [4, 6, 3]), whole.boxes(start, [4, 6, 3]))
    assert not level.complete  # only what was read is filled
    assert torch.equal(level.values(), whole.values()) and level.complete


def test_mind_is_local_and_floored():
    image = torch.rand(12, 13, 14)
    changed = image.clone()
    changed[:, :, 10:] = 0.5
    reach = 2  # dilation 1 + patch radius 1
    assert torch.equal(mind_ssc(image)[:, :, :, : 10 - reach], mind_ssc(changed)[:, :, :, : 10 - reach])
    flat = mind_ssc(torch.full((6, 6, 6), 0.25))
    assert torch.equal(flat, torch.ones_like(flat))
    with pytest.raises(BadInputError, match="variance_floor"):
        MindFeaturizer(variance_floor=0)
    with pytest.raises(BadInputError, match="hu_window"):
        MindFeaturizer(hu_window=(100, -100))
    assert MindFeaturizer(variance_floor=1e-4).config != MindFeaturizer().config


@pytest.mark.parametrize(
    ("options", "partial"),
    [(MatchOptions(), True), (MatchOptions(exact=True), True), (MatchOptions(mode="global"), False)],
    ids=["default", "exact", "global"],
)
def test_matching_on_region_pyramids_equals_complete_ones(options, partial):
    fixed = _textured_volume((28, 36, 32))
    moving = _shifted(fixed, (1, -2, 3))
    featurizer = MindFeaturizer()
    ijk = np.array([[5.0, 6.0, 3.0], [30.0, 33.0, 26.0]])  # one at the border
    points = fixed.geometry.ijk_to_lps(ijk)
    options = dataclasses.replace(options, search_radius_mm=6.0)
    complete = match_points(featurizer.extract(fixed), featurizer.extract(moving), points, options=options)
    fixed_regions, moving_regions = featurizer.extract_regions(fixed), featurizer.extract_regions(moving)
    lazy = match_points(fixed_regions, moving_regions, points, options=options)
    assert np.array_equal(lazy.points_lps_mm, complete.points_lps_mm)
    assert np.array_equal(lazy.similarity, complete.similarity)
    assert np.array_equal(lazy.forward_backward_mm, complete.forward_backward_mm, equal_nan=True)
    assert fixed_regions.levels[0].complete is not partial and moving_regions.levels[0].complete is not partial


def test_worker_state_fills_a_region_pyramid_for_whole_volume_jobs():
    state = WorkerState(2**30, Limits(), lambda level, message: None)
    volume = _textured_volume((20, 24, 22))
    settings = RunSettings(backbone="mind")
    first = state.features(settings, volume, "cpu", lambda *args: None, regions=True)
    assert not first.cached and not first.pyramid.complete
    assert first.pyramid.filled_bytes == 0 < first.pyramid.nbytes
    first.pyramid.levels[0].ensure_boxes(np.array([[0, 0, 0]]), np.array([[4, 4, 4]]))
    assert 0 < state.cache.describe()["filled_bytes"] < state.cache.describe()["used_bytes"] == first.pyramid.nbytes
    again = state.features(settings, volume, "cpu", lambda *args: None, regions=True)
    assert again.cached and again.pyramid is first.pyramid
    stages = []
    whole = state.features(settings, volume, "cpu", lambda stage, *rest: stages.append(stage))
    assert whole.pyramid is first.pyramid and whole.pyramid.complete and not whole.cached and "features" in stages
    assert whole.pyramid.filled_bytes == whole.pyramid.nbytes
    reference = MindFeaturizer().extract(volume)
    for level, expected in zip(whole.pyramid.levels, reference.levels):
        assert torch.equal(level.features, expected.features)


def test_stored_sampling_equals_grid_sample_also_outside_and_on_thin_axes():
    rng = np.random.default_rng(3)
    for shape in ((7, 6, 9), (1, 6, 1)):
        values = torch.from_numpy(rng.random((5, *shape), dtype=np.float32))
        ijk = torch.from_numpy(rng.random((300, 3), dtype=np.float32)) * (torch.tensor(shape[::-1]) + 4.0) - 2.0
        torch.testing.assert_close(sample_stored(values, ijk), sample(values, ijk), atol=1e-6, rtol=0)
        half = sample_stored(values.half(), ijk)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, sample(values.half().float(), ijk), atol=1e-6, rtol=0)


def test_half_precision_storage_halves_memory_and_keeps_the_matches():
    fixed = _textured_volume((24, 30, 28))
    moving = _shifted(fixed, (1, 2, -1))
    points = fixed.geometry.ijk_to_lps(np.array([[8.0, 9.0, 7.0], [16.5, 15.0, 12.0]]))
    options = MatchOptions(search_radius_mm=6.0)
    results, sizes = {}, {}
    for dtype in ("float32", "float16"):
        featurizer = MindFeaturizer(dtype=dtype)
        pyramids = featurizer.extract(fixed), featurizer.extract(moving)
        assert all(level.features.dtype == getattr(torch, dtype) for level in pyramids[0].levels)
        sizes[dtype] = pyramids[0].nbytes
        results[dtype] = match_points(*pyramids, points, options=options)
    assert sizes["float16"] * 2 == sizes["float32"]
    np.testing.assert_allclose(results["float16"].points_lps_mm, results["float32"].points_lps_mm, atol=0.01)
    np.testing.assert_allclose(results["float16"].similarity, results["float32"].similarity, atol=1e-3)
    with pytest.raises(BadInputError, match="dtype"):
        MindFeaturizer(dtype="int8")


def test_a_pooled_levels_blocks_span_about_as_many_working_voxels_and_its_fill_steps_count_them():
    calls = []

    def compute(lo_kji: np.ndarray, hi_kji: np.ndarray) -> torch.Tensor:
        calls.append((tuple(int(n) for n in lo_kji), tuple(int(n) for n in hi_kji)))
        return torch.ones((1, *(np.asarray(hi_kji) - np.asarray(lo_kji))))

    shape = (10, 12, 20)
    features = torch.zeros((1, *shape))
    filler = RegionFiller(compute, shape, scale=4)
    assert filler.block == BLOCK // 4 and RegionFiller(compute, shape, scale=16).block == MIN_BLOCK
    filler.ensure(features, np.array([4, 4, 4]), np.array([5, 5, 5]))
    assert calls == [((2, 2, 2), (8, 8, 8))]  # its block and one block (two level voxels) around it
    filler.fill_some(features, 4**3 * 2 * 2 * 20 * 3)  # working voxels of three rows of blocks
    assert calls[1] == ((0, 0, 0), (2, 6, 20))


def test_filling_behind_completes_the_coarsest_level_first():
    pyramid = MindFeaturizer().extract_regions(_textured_volume((20, 24, 22)))
    completed = []
    while pyramid.fill_some(BLOCK**3):
        completed += [level.name for level in pyramid.levels if level.complete and level.name not in completed]
    assert completed == ["mind_1/4", "mind_1/2", "mind_1/1"]


def test_a_pooled_level_filled_step_by_step_resamples_each_working_voxel_about_once(monkeypatch):
    from MedDIFTLib.core.resample import WorkingImage

    resampled = []
    box = WorkingImage.box

    def counted(self, lo_kji: np.ndarray, hi_kji: np.ndarray) -> np.ndarray:
        resampled.append(np.prod(hi_kji - lo_kji))
        return box(self, lo_kji, hi_kji)

    monkeypatch.setattr(WorkingImage, "box", counted)
    volume = _textured_volume((40, 48, 44))
    featurizer = MindFeaturizer(scales=(4,))
    level = featurizer.extract_regions(volume).levels[0]
    steps = 0
    while not level.complete:
        level.fill_some(4**3 * 64)
        steps += 1
    assert steps > 3 and sum(resampled) <= 1.2 * np.prod(np.asarray(level.geometry.shape_kji) * 4)
    assert torch.equal(level.features, featurizer.extract(volume).levels[0].features)


def test_a_cropped_pyramid_holds_the_whole_volumes_descriptors_and_fills_only_its_box():
    from MedDIFTLib.grid.sampling import sample_lps

    volume = _textured_volume((23, 30, 26))
    featurizer = MindFeaturizer()
    whole, regions = featurizer.extract(volume), featurizer.extract_regions(volume)
    lo, hi = np.array([6, 4, 3]), np.array([19, 15, 12])
    cropped, cropped_regions = whole.cropped(lo, hi), regions.cropped(lo, hi)
    assert cropped.image_geometry == volume.geometry.box(lo, hi) and cropped.complete
    assert not regions.complete  # only the box (and the filler's blocks around it) was computed
    rng = np.random.default_rng(2)
    points = volume.geometry.ijk_to_lps(lo + rng.uniform(0.0, 1.0, (40, 3)) * (hi - 1 - lo))
    for level, region_level, reference in zip(cropped.levels, cropped_regions.levels, whole.levels):
        assert torch.equal(level.features, region_level.features) and level.geometry == region_level.geometry
        np.testing.assert_allclose(sample_lps(level.features.float(), level.geometry, points),
                                   sample_lps(reference.features.float(), reference.geometry, points), atol=1e-6)
