"""The backbone registry: names, options, weights, and the fused backbone (``mind+maisi``) end to end.

The MAISI part runs with the tiny networks of ``test_maisi_backbone.py`` (same MONAI classes,
official checkpoint layouts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_maisi_backbone import SMALL, Phantom, tiny_config, write_checkpoints

from MedDIFTLib import cli
from MedDIFTLib.core.errors import BadInputError, MissingWeightsError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume, read_points, write_volume
from MedDIFTLib.core.options import MatchOptions
from MedDIFTLib.features import (
    BACKBONES,
    FusedFeaturizer,
    available_backbones,
    backbone_spec,
    create_featurizer,
)
from MedDIFTLib.matching import match_points

SHIFT_LPS_MM = np.array([6.0, -4.0, 5.0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest single-threaded, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_maisi(tmp_path_factory) -> tuple[Path, Path]:
    """(weights folder, configuration JSON) of tiny v1 MAISI networks."""
    root = tmp_path_factory.mktemp("fused_tiny")
    config = tiny_config()
    write_checkpoints(config, root / "weights")
    config_path = root / "tiny-ddpm-ct.json"
    config_path.write_text(json.dumps(config))
    return root / "weights", config_path


def shifted(volume: Volume, shift_lps_mm: np.ndarray) -> Volume:
    """The same voxels with the origin moved: a pure translation whose matches are known exactly."""
    geometry = volume.geometry
    moved = Geometry.create(
        geometry.shape_ijk, geometry.spacing_mm, np.asarray(geometry.origin_lps_mm) + shift_lps_mm,
        geometry.direction_matrix,
    )
    return Volume(volume.voxels, moved)


# --- registry ----------------------------------------------------------------------------------------------------


def test_every_listed_backbone_names_its_class_options_and_weights():
    assert {"mind", "maisi", "mind+maisi"} <= set(available_backbones())
    for name in available_backbones():
        spec = backbone_spec(name)
        assert spec.name == name and "device" in spec.option_names() and spec.summary
        featurizer_class = spec.featurizer_class()
        if name in ("mind", "maisi"):
            assert featurizer_class.requires_weights is spec.requires_weights
    assert not backbone_spec("mind").requires_weights and backbone_spec("maisi").requires_weights
    assert backbone_spec("mind+maisi").requires_weights
    assert backbone_spec("mind").weights_status() == (True, "needs no weights")
    with pytest.raises(BadInputError, match="unknown backbone 'dino'; choose one of: maisi, mind, mind\\+maisi"):
        backbone_spec("dino")


def test_a_weight_free_backbone_takes_and_ignores_a_weights_folder(tmp_path):
    featurizer = create_featurizer("mind", weights_dir=tmp_path / "absent", scales=(1, 2))
    assert featurizer.config["scales"] == [1, 2]
    with pytest.raises(BadInputError, match="does not take option\\(s\\) timestep"):
        create_featurizer("mind", timestep=20)
    for options, pattern in (({"weights": [1.0]}, "1 weights for 3 scales"), ({"scales": [0, 2]}, ">= 1"),
                             ({"device": "tpu"}, "device")):
        with pytest.raises(BadInputError, match=pattern):
            create_featurizer("mind", **options)
    assert create_featurizer("mind", device="auto").device.type in ("cpu", "cuda")


def test_fused_options_are_routed_to_their_part_and_bad_ones_are_named():
    spec = backbone_spec("mind+maisi")
    names = spec.option_names()
    assert names[:3] == ["device", "weights_dir", "part_weights"]
    assert "mind.scales" in names and "maisi.timestep" in names and "maisi.config" in names
    assert "timestep" not in names and "maisi.device" not in names and "mind.weights_dir" not in names
    routed, part_weights = spec.route(
        {"device": "cpu", "weights_dir": "W", "maisi.timestep": 30, "mind.scales": [1], "part_weights": [1, 2]}
    )
    assert routed == {
        "mind": {"device": "cpu", "scales": [1]},
        "maisi": {"device": "cpu", "weights_dir": "W", "timestep": 30},
    }
    assert part_weights == [1, 2]
    for options, pattern in (
        ({"timestep": 20}, "does not take option\\(s\\) timestep"),
        ({"maisi.steps": 20}, "maisi.steps"),
        ({"part_weights": [1.0]}, "1 numbers for 2 parts"),
        ({"part_weights": [1.0, -1.0]}, "positive"),
        ({"part_weights": "1,2"}, "list of 2 numbers"),
    ):
        with pytest.raises(BadInputError, match=pattern):
            create_featurizer("mind+maisi", **options)
    for name, pattern in (("maisi+maisi", "two or more different"), ("mind+dino", "unknown backbone"),
                          ("mind+", "unknown backbone"), ("mind+maisi+mind", "two or more different")):
        with pytest.raises(BadInputError, match=pattern):
            backbone_spec(name)
    assert backbone_spec("maisi+mind").name == "maisi+mind" and "maisi+mind" not in BACKBONES


# --- the fused backbone end to end ---------------------------------------------------------------------------------


def test_fused_backbone_unites_the_levels_with_per_part_shares_and_matches(tiny_maisi):
    weights_dir, config_path = tiny_maisi
    options = {"weights_dir": weights_dir, "maisi.config": str(config_path), "mind.scales": [1, 2]}
    fused = create_featurizer("mind+maisi", part_weights=[1.0, 3.0], **options)
    assert isinstance(fused, FusedFeaturizer) and fused.name == "mind+maisi" and fused.requires_weights
    mind, maisi = fused.parts["mind"], fused.parts["maisi"]
    fixed = Phantom().volume(SMALL)
    pyramid = fused.extract(fixed)
    assert pyramid.backbone == "mind+maisi" and pyramid.image_geometry == SMALL
    mind_alone, maisi_alone = mind.extract(fixed), maisi.extract(fixed)
    assert [level.name for level in pyramid.levels] == [
        level.name for level in (*mind_alone.levels, *maisi_alone.levels)
    ]
    for level, alone in zip(pyramid.levels, (*mind_alone.levels, *maisi_alone.levels)):
        assert torch.equal(level.features, alone.features) and level.geometry == alone.geometry
        assert level.patch_radius == alone.patch_radius
    weights = np.array([level.weight for level in pyramid.levels])
    assert weights[:2] == pytest.approx([0.5, 0.5]) and weights[2:] == pytest.approx([0.75] * 4)

    moving = shifted(fixed, SHIFT_LPS_MM)
    points = fixed.geometry.ijk_to_lps([[15, 14, 13], [10, 12, 14], [18, 16, 10]])
    # exact scoring: the coarse MAISI levels carry most of the weight here (see MatchOptions.exact)
    options = MatchOptions(search_radius_mm=12.0, exact=True)
    result = match_points(pyramid, fused.extract(moving), points, options=options)
    assert np.allclose(result.points_lps_mm, points + SHIFT_LPS_MM, atol=1.0)


def test_fused_config_identifies_the_features_and_weights_are_its_parts(tiny_maisi, tmp_path):
    weights_dir, config_path = tiny_maisi
    options = {"weights_dir": weights_dir, "maisi.config": str(config_path), "mind.scales": [1, 2]}
    config = create_featurizer("mind+maisi", **options).config
    assert [part["name"] for part in config["parts"]] == ["mind", "maisi"] and config["part_weights"] == [1.0, 1.0]
    assert config["parts"][1]["config"]["config"] == "tiny-ddpm-ct"
    json.dumps(config)  # it keys the worker's feature cache
    for changed in ({"maisi.timestep": 40}, {"mind.scales": [1]}, {"part_weights": [2, 1]}):
        assert create_featurizer("mind+maisi", **{**options, **changed}).config != config, changed
    assert create_featurizer("mind+maisi", **options).config == config

    spec = backbone_spec("mind+maisi")
    present, message = spec.weights_status(weights_dir=tmp_path, **{"maisi.config": str(config_path)})
    assert not present and message.startswith("maisi: ") and "diff_unet_3d_ddpm-ct.pt" in message
    assert spec.weights_status(weights_dir=weights_dir, **{"maisi.config": str(config_path)})[0]
    with pytest.raises(MissingWeightsError, match="meddift weights download"):
        create_featurizer("mind+maisi", weights_dir=tmp_path, **{"maisi.config": str(config_path)})


def test_meddift_match_runs_a_fused_backbone_with_routed_options(tiny_maisi, tmp_path):
    weights_dir, config_path = tiny_maisi
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    volume = Phantom().volume(SMALL)
    write_volume(volume, fixed)
    write_volume(shifted(volume, SHIFT_LPS_MM), moving)
    points = tmp_path / "points.csv"
    points.write_text("label,l,p,s\nA,0.0,0.0,0.0\nB,-6.0,4.0,2.0\n")
    out = tmp_path / "matches.csv"
    arguments = ["match", str(fixed), str(moving), "--points", str(points), "--out", str(out), "--quiet",
                 "--device", "cpu", "--search-radius-mm", "12", "--exact", "--backbone", "mind+maisi",
                 "--weights-dir", str(weights_dir), "--backbone-option", f"maisi.config={config_path}",
                 "--backbone-option", "part_weights=[1, 2]", "--backbone-option", "mind.scales=[1, 2]"]
    assert cli.main(arguments) == 0
    matched = read_points(out)
    assert matched.labels == ["A", "B"]
    expected = np.array([[0.0, 0.0, 0.0], [-6.0, 4.0, 2.0]]) + SHIFT_LPS_MM
    assert np.allclose(matched.points_lps_mm, expected, atol=1.0)


# --- the command line with a weight-free backbone --------------------------------------------------------------------


def test_meddift_match_with_mind_accepts_a_weights_folder(elastix_ct, elastix_landmarks, tmp_path):
    """``--weights-dir`` is one command line for every backbone; MIND needs no weights and ignores it."""
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    write_volume(elastix_ct, fixed)
    write_volume(shifted(elastix_ct, SHIFT_LPS_MM), moving)
    chosen = elastix_landmarks.points_lps_mm[:3]
    points = tmp_path / "points.csv"
    rows = "".join(f"P{n},{','.join(map(str, point))}\n" for n, point in enumerate(chosen))
    points.write_text("label,l,p,s\n" + rows)
    out = tmp_path / "matches.csv"
    arguments = ["match", str(fixed), str(moving), "--points", str(points), "--out", str(out), "--quiet",
                 "--device", "cpu", "--backbone", "mind", "--weights-dir", str(tmp_path / "no-weights-here")]
    assert cli.main(arguments) == 0
    matched = read_points(out)
    assert matched.labels == ["P0", "P1", "P2"]
    assert np.allclose(matched.points_lps_mm, chosen + SHIFT_LPS_MM, atol=1.0)


def test_mind_levels_are_stored_with_unit_norm_and_say_so():
    image = np.random.default_rng(0).normal(0.0, 300.0, (20, 18, 16)).astype(np.float32)
    pyramid = create_featurizer("mind").extract(Volume(image, Geometry.create((16, 18, 20), (1.0, 1.0, 1.5))))
    for level in pyramid.levels:
        assert level.unit_norm and level.features.dtype == torch.float16
        norm = level.features.float().norm(dim=0).numpy()
        np.testing.assert_allclose(norm, 1.0, atol=1e-3)  # half precision: 11 significant bits


def _thick_slice_texture(spacing_mm: tuple[float, float, float], seed: int = 0) -> Volume:
    """A smooth random texture sampled on a grid of ``spacing_mm`` over about 48 x 48 x 48 mm."""
    from scipy import ndimage

    shape_ijk = [int(round(48.0 / s)) for s in spacing_mm]
    fine = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(96, 96, 96)), 3.0)
    kji = np.meshgrid(*[np.arange(n) * s / 0.5 for n, s in zip(shape_ijk[::-1], spacing_mm[::-1])], indexing="ij")
    voxels = ndimage.map_coordinates(fine, kji, order=1) * 4000.0 - 300.0
    return Volume(voxels.astype(np.float32), Geometry.create(shape_ijk, spacing_mm, (10.0, -20.0, 30.0)))


def test_mind_descriptors_live_on_an_isotropic_grid_of_the_finest_spacing():
    """Thick slices (1.5 x 1.5 x 4.5 mm): the levels lie on cubic voxels of 1.5 mm (then 3, 6) over
    the same extent and orientation, never finer than 1.25 mm; the pyramid keeps the image's own
    grid; cubic voxels and ``isotropic=False`` keep the native grid; the choice is part of the
    features' identity."""
    thick = _thick_slice_texture((1.5, 1.5, 4.5))
    pyramid = create_featurizer("mind").extract(thick)
    assert pyramid.image_geometry == thick.geometry
    for level, scale in zip(pyramid.levels, (1, 2, 4)):
        np.testing.assert_allclose(level.geometry.spacing_mm, (1.5 * scale,) * 3)
    assert np.allclose(pyramid.levels[0].geometry.origin_lps_mm, thick.geometry.origin_lps_mm)
    assert pyramid.levels[0].geometry.shape_ijk[2] == 31  # 10 slices of 4.5 mm: 45 mm at 1.5 mm
    native = create_featurizer("mind", isotropic=False).extract(thick)
    assert native.levels[0].geometry == thick.geometry
    assert native.config != pyramid.config
    for cubic_mm in (2.0, 0.8):
        cubic = _thick_slice_texture((cubic_mm,) * 3)
        assert create_featurizer("mind").extract(cubic).levels[0].geometry == cubic.geometry
    fine_thick = _thick_slice_texture((1.0, 1.0, 2.0))  # a full-resolution CT: not finer than 1.25 mm
    np.testing.assert_allclose(create_featurizer("mind").extract(fine_thick).levels[0].geometry.spacing_mm, (1.25,) * 3)
    with pytest.raises(BadInputError, match="spacing_mm"):
        create_featurizer("mind", spacing_mm=-1.0)


@pytest.mark.parametrize("spacing_mm", [(1.5, 1.5, 4.5), (2.0, 2.0, 2.0)])
def test_mind_levels_read_one_resampling_and_equal_each_level_computed_alone(spacing_mm, monkeypatch):
    """``extract`` resamples the working image once for all levels, and each level is bitwise what
    resampling, clipping, scaling, pooling and MIND-SSC of that level alone give (thick slices on a
    resampled working grid, and cubic voxels read as they are)."""
    import torch.nn.functional as F

    from MedDIFTLib.core.resample import WorkingImage
    from MedDIFTLib.features.mind import MindFeaturizer, _unit_norm_, mind_ssc

    volume = _thick_slice_texture(spacing_mm)
    featurizer = MindFeaturizer(scales=(1, 2, 3), dtype="float32")
    image = featurizer.working_image(volume)
    low, high = featurizer.hu_window
    expected = []
    for scale in featurizer.scales:
        shape = np.asarray(image.geometry.downsampled(scale).shape_kji)
        voxels = np.clip(image.box(np.zeros(3, int), shape * scale), low, high)
        normalised = (torch.from_numpy(voxels) - low) / (high - low)
        pooled = F.avg_pool3d(normalised[None, None], scale, stride=scale)[0, 0] if scale > 1 else normalised
        expected.append(_unit_norm_(mind_ssc(pooled)))
    resampled = []
    box = WorkingImage.box

    def counted(self, lo_kji: np.ndarray, hi_kji: np.ndarray) -> np.ndarray:
        resampled.append((tuple(lo_kji), tuple(hi_kji)))
        return box(self, lo_kji, hi_kji)

    monkeypatch.setattr(WorkingImage, "box", counted)
    levels = featurizer.extract(volume).levels
    assert len(resampled) == 1
    for level, values in zip(levels, expected):
        assert torch.equal(level.features, values)


def test_thick_slice_matches_are_reported_in_the_images_world_millimetres():
    """A thick-slice texture and the same texture moved by (2, -3, 5) mm: matches on the isotropic
    working grid come back in the input's LPS mm, within a fraction of the 4.5 mm slices."""
    shift_mm = np.array([2.0, -3.0, 5.0])
    fixed = _thick_slice_texture((1.5, 1.5, 4.5))
    moved_geometry = Geometry.create(fixed.geometry.shape_ijk, fixed.geometry.spacing_mm,
                                     np.asarray(fixed.geometry.origin_lps_mm) + shift_mm)
    moving = Volume(fixed.voxels.copy(), moved_geometry)  # the same voxels placed shift_mm further
    mind = create_featurizer("mind")
    centre = fixed.geometry.ijk_to_lps(np.array([[12.0, 14.0, 5.0], [20.0, 12.0, 4.0], [16.0, 20.0, 6.0]]))
    found = match_points(mind.extract(fixed), mind.extract(moving), centre, options=MatchOptions(search_radius_mm=12.0))
    np.testing.assert_allclose(found.points_lps_mm - centre, np.tile(shift_mm, (3, 1)), atol=0.75)
