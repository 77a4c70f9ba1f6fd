"""The MAISI backbone, run with tiny networks of the same MONAI classes saved in the official checkpoint layouts.

Full-size networks with random weights run only in the ``slow`` test; ``gpu`` tests need CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from MedDIFTLib.core.errors import BadInputError, CancelledError, MissingWeightsError, OutOfMemoryError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume
from MedDIFTLib.core.options import MatchOptions
from MedDIFTLib.features import create_featurizer, maisi
from MedDIFTLib.matching import match_points, sample_descriptors


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest single-threaded, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(kind: str = "ddpm-ct") -> dict:
    """The packaged configuration with small channel counts: same classes, same key structure."""
    config = maisi.load_config(kind)
    config["name"] = f"tiny-{kind}"
    config["autoencoder"].update(num_channels=[8, 16, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4)
    config["diffusion_unet"].update(
        num_channels=[8, 16, 16, 32], num_res_blocks=[1, 1, 1, 1], norm_num_groups=4, num_head_channels=[0, 0, 8, 8]
    )
    return config


def write_checkpoints(config: dict, folder: Path, seed: int = 0, unet_extra: dict | None = None) -> Path:
    """Random networks of ``config`` saved like MAISI: a plain autoencoder state dict, a UNet checkpoint dict."""
    torch.manual_seed(seed)
    autoencoder, unet = maisi.build_networks(config)
    with torch.no_grad():
        for parameter in [*autoencoder.parameters(), *unet.parameters()]:
            if not parameter.any():  # MONAI zero-initialises some output convolutions
                parameter.normal_(0.0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(autoencoder.state_dict(), folder / config["autoencoder_file"])
    checkpoint = {
        "epoch": 1,
        "loss": torch.tensor(0.1),
        "num_train_timesteps": 1000,
        "scale_factor": torch.tensor(1.3),
        "unet_state_dict": unet.state_dict(),
        **(unet_extra or {}),
    }
    torch.save(checkpoint, folder / config["unet_file"])
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(weights folder, configuration JSON) of tiny v1 networks."""
    root = tmp_path_factory.mktemp("maisi_tiny")
    config = tiny_config()
    write_checkpoints(config, root / "weights")
    config_path = root / "tiny-ddpm-ct.json"
    config_path.write_text(json.dumps(config))
    return root / "weights", config_path


@pytest.fixture(scope="module")
def featurizer(tiny) -> maisi.MaisiFeaturizer:
    weights_dir, config_path = tiny
    return maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path)


class Phantom:
    """A CT-like function of LPS mm: air-filled lung-like background with Gaussian blobs of tissue and bone."""

    def __init__(self, seed: int = 1, count: int = 40, half_width_mm: float = 40.0) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.uniform(-half_width_mm, half_width_mm, (count, 3))
        self.widths = rng.uniform(4.0, 10.0, count)
        self.amplitudes = rng.uniform(-800.0, 1500.0, count)

    def hu(self, points_lps_mm: np.ndarray) -> np.ndarray:
        squared = ((points_lps_mm[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return -700.0 + (self.amplitudes * np.exp(-squared / (2 * self.widths**2))).sum(-1)

    def volume(self, geometry: Geometry) -> Volume:
        k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij")
        points = geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
        return Volume(self.hu(points).reshape(geometry.shape_kji).astype(np.float32), geometry)


HOST_MEMORY = "MedDIFTLib.features.maisi.featurizer.available_host_bytes"
SMALL = Geometry.create((30, 28, 26), (2.0, 2.0, 2.5), (-30.0, -28.0, -32.0))


def raw_descriptors(level, points_lps_mm: np.ndarray) -> torch.Tensor:
    """Trilinear samples (N, C) of a level at LPS points, not normalised."""
    ijk = level.geometry.lps_to_ijk(points_lps_mm)
    grid = (2 * ijk / (np.asarray(level.geometry.shape_ijk) - 1) - 1)[None, :, None, None, :]
    samples = torch.nn.functional.grid_sample(
        level.features[None].float(), torch.as_tensor(grid, dtype=torch.float32), align_corners=True
    )
    return samples[0, :, :, 0, 0].T


# --- configuration -----------------------------------------------------------------------------------------------


def test_packaged_v1_configuration_is_the_official_one():
    config = maisi.load_config("ddpm-ct")
    autoencoder, unet = config["autoencoder"], config["diffusion_unet"]
    assert (autoencoder["latent_channels"], autoencoder["num_channels"], autoencoder["num_res_blocks"]) == (
        4,
        [64, 128, 256],
        [2, 2, 2],
    )
    assert (autoencoder["norm_num_groups"], autoencoder["norm_eps"]) == (32, 1e-6)
    assert autoencoder["attention_levels"] == [False] * 3
    assert not autoencoder["with_encoder_nonlocal_attn"] and not autoencoder["with_decoder_nonlocal_attn"]
    assert unet["num_channels"] == [64, 128, 256, 512]
    assert unet["attention_levels"] == [False, False, True, True]
    assert unet["num_head_channels"] == [0, 0, 32, 32]
    assert unet["num_res_blocks"] == [2, 2, 2, 2]
    assert unet["include_top_region_index_input"] and unet["include_bottom_region_index_input"]
    assert unet["include_spacing_input"] and not unet["resblock_updown"] and unet["num_class_embeds"] is None
    assert (config["autoencoder_file"], config["unet_file"]) == ("autoencoder_v1.pt", "diff_unet_3d_ddpm-ct.pt")
    assert config["noise_scheduler"]["schedule"] == "scaled_linear_beta"
    assert sorted(maisi.packaged_configs()) == ["ddpm-ct", "rflow-ct"]


def test_packaged_configurations_build_and_v2_state_dict_differs():
    keys = {}
    for name in ("ddpm-ct", "rflow-ct"):
        with torch.device("meta"):
            autoencoder, unet = maisi.build_networks(maisi.load_config(name))
        keys[name] = set(unet.state_dict())
        assert [block.resnets[0].out_channels for block in unet.up_blocks] == [512, 256, 128, 64]
        assert sum(p.numel() for p in autoencoder.parameters()) > 20_000_000
    assert "top_region_index_layer.0.weight" in keys["ddpm-ct"] - keys["rflow-ct"]
    assert "class_embedding.weight" in keys["rflow-ct"] - keys["ddpm-ct"]


def test_configuration_must_write_out_every_constructor_argument():
    config = tiny_config()
    del config["diffusion_unet"]["norm_eps"]
    with pytest.raises(BadInputError, match="missing norm_eps"):
        maisi.build_networks(config)
    config = tiny_config()
    config["autoencoder"]["latent_dim"] = 4
    with pytest.raises(BadInputError, match="unknown latent_dim"):
        maisi.build_networks(config)
    with pytest.raises(BadInputError, match="unknown MAISI configuration"):
        maisi.load_config("ddpm-mr")


# --- geometry ----------------------------------------------------------------------------------------------------


def test_level_layouts_of_the_full_size_networks():
    v1 = maisi.level_layouts(maisi.load_config("ddpm-ct"))
    assert [(lv.channels, lv.factor, lv.offset) for lv in v1] == [(512, 16, 3), (256, 8, 3), (128, 4, 3), (64, 4, 3)]
    v2 = maisi.level_layouts(maisi.load_config("rflow-ct"))
    # v2 down-samples by average pooling: level voxel n sits at latent 2n + 0.5 per stage
    assert [(lv.factor, lv.offset) for lv in v2] == [(16, 3 + 4 * 1.5), (8, 3 + 4 * 0.5), (4, 3), (4, 3)]
    assert maisi.model_size_multiple(maisi.load_config("ddpm-ct")) == 32


def _without_group_norm(network: torch.nn.Module) -> torch.nn.Module:
    """GroupNorm (global statistics) -> identity, so every output voxel has a finite receptive field."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    return network


def _support_centre_along_axis0(output: torch.Tensor, inputs: torch.Tensor, index: int) -> float:
    """Centre (first spatial axis) of the input voxels that influence output voxel ``index`` there."""
    middle = [n // 2 for n in output.shape[3:]]
    (gradient,) = torch.autograd.grad(output[0, :, index, middle[0], middle[1]].sum(), inputs, retain_graph=True)
    influence = gradient[0].abs().sum(dim=(0, 2, 3))
    support = torch.nonzero(influence > 0).ravel()
    first, last = int(support.min()), int(support.max())
    assert 0 < first and last < inputs.shape[2] - 1, "receptive field clipped by the border: use a larger input"
    return (first + last) / 2


@pytest.mark.parametrize("kind", ["ddpm-ct", "rflow-ct"])
def test_level_offsets_are_the_receptive_field_centres_of_the_networks(kind):
    """The geometry's per-stage centres (encoder 2n+1; UNet 2n or 2n+0.5) measured on MONAI's own modules."""
    config = tiny_config(kind)
    config["diffusion_unet"]["attention_levels"] = [False] * 4  # attention is global; the down path needs none
    torch.manual_seed(0)
    autoencoder, unet = (_without_group_norm(network) for network in maisi.build_networks(config))
    image = torch.rand(1, 1, 128, 32, 32, requires_grad=True)
    latent_index = 16
    encoder_centre = _support_centre_along_axis0(autoencoder.encode(image)[0], image, latent_index)
    assert encoder_centre == 4 * latent_index + 3

    latent = torch.rand(1, 4, 96, 16, 16, requires_grad=True)
    captured: dict[int, torch.Tensor] = {}

    def keep(level: int):
        def hook(module, args, output) -> None:
            captured[level] = output[0]

        return hook

    handles = [block.register_forward_hook(keep(n + 1)) for n, block in enumerate(unet.down_blocks[:2])]
    conditioning = {
        "spacing_tensor": torch.full((1, 3), 200.0),
        "top_region_index_tensor": torch.tensor([[0.0, 100.0, 0.0, 0.0]]),
        "bottom_region_index_tensor": torch.tensor([[0.0, 100.0, 0.0, 0.0]]),
        "class_labels": torch.tensor([1]) if unet.num_class_embeds else None,
    }
    unet(latent, torch.tensor([20]), **conditioning)
    for handle in handles:
        handle.remove()
    layouts = {layout.factor: layout for layout in maisi.level_layouts(config)}
    for level, features in captured.items():
        index = features.shape[2] // 2
        latent_centre = _support_centre_along_axis0(features, latent, index)
        model_centre = 4 * latent_centre + 3
        layout = layouts[4 * 2**level]
        assert model_centre == pytest.approx(layout.factor * index + layout.offset)


def test_model_grid_is_ras_ordered_covers_the_image_and_never_shrinks():
    image = Geometry.create((200, 150, 90), (1.0, 1.2, 2.0), (5.0, -3.0, 7.0))
    grid = maisi.model_grid(image, None, 32)
    assert np.allclose(grid.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    assert grid.shape_ijk == (224, 160, 96) and grid.spacing_mm == (1.0, 1.2, 2.0)
    centre = image.ijk_to_lps(((np.asarray(image.shape_ijk) - 1) / 2)[None])
    assert np.allclose(grid.ijk_to_lps(((np.asarray(grid.shape_ijk) - 1) / 2)[None]), centre)
    assert grid.contains_lps(image.ijk_to_lps([[0, 0, 0], [199, 149, 89]]), margin_voxels=0).all()

    # the same box stored with permuted and flipped axes gets the same model grid
    swapped = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # columns: image axes in LPS
    corner = image.ijk_to_lps([[199, 0, 89]])[0]
    other = Geometry.create((150, 200, 90), (1.2, 1.0, 2.0), corner, swapped)
    assert maisi.model_grid(other, None, 32).same_grid(grid)

    # an oblique scan stays oblique; a given spacing is used as is
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = maisi.model_grid(Geometry.create((64, 64, 40), (1.0, 1.0, 1.0), (0, 0, 0), rotation), 1.5, 32)
    assert np.allclose(oblique.direction_matrix, rotation @ np.diag([-1.0, -1.0, 1.0]))
    assert oblique.spacing_mm == (1.5, 1.5, 1.5) and oblique.shape_ijk == (64, 64, 32)


def test_resampling_puts_content_at_its_world_position(featurizer):
    """A smooth spot lands on the model voxels whose LPS position the grid reports, whatever the image axes."""
    spot_lps = np.array([4.0, -6.0, 10.0])
    flipped = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    for geometry in (SMALL, Geometry.create((28, 30, 26), (2.0, 2.0, 2.5), (-20.0, 30.0, 33.0), flipped)):
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape_ijk], indexing="ij"), -1).reshape(-1, 3)
        squared = ((geometry.ijk_to_lps(ijk) - spot_lps) ** 2).sum(axis=1)
        voxels = (-1000.0 + 2000.0 * np.exp(-squared / (2 * 4.0**2))).reshape(geometry.shape_ijk).transpose(2, 1, 0)
        volume = Volume(np.ascontiguousarray(voxels, dtype=np.float32), geometry)
        grid = featurizer.model_grid(geometry)
        weights = maisi.model_image(volume, grid, featurizer.hu_window)  # (I, J, K), air = 0
        grid_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape_ijk], indexing="ij"), -1)
        centroid_ijk = (grid_ijk * weights[..., None]).reshape(-1, 3).sum(0) / weights.sum()
        assert np.allclose(grid.ijk_to_lps(centroid_ijk[None])[0], spot_lps, atol=0.05)


# --- extraction ---------------------------------------------------------------------------------------------------


def test_extract_gives_levels_on_exact_world_grids(featurizer):
    volume = Phantom().volume(SMALL)
    pyramid = featurizer.extract(volume)
    grid = featurizer.model_grid(SMALL)
    assert pyramid.image_geometry == SMALL and pyramid.backbone == "maisi"
    assert [level.name for level in pyramid.levels] == [
        "maisi_up0_1/16",
        "maisi_up1_1/8",
        "maisi_up2_1/4",
        "maisi_up3_1/4",
    ]
    assert [level.channels for level in pyramid.levels] == [32, 16, 16, 8]
    for level, layout in zip(pyramid.levels, featurizer.layouts):
        assert level.geometry.shape_ijk == tuple(n // layout.factor for n in grid.shape_ijk)
        assert level.features.dtype == torch.float32 and torch.isfinite(level.features).all()
        level_ijk = np.array([[0, 0, 0], [1, 2, 0], [1, 1, 1]], float)
        expected = grid.ijk_to_lps(layout.factor * level_ijk + layout.offset)
        assert np.allclose(level.geometry.ijk_to_lps(level_ijk), expected)
    assert pyramid.config == featurizer.config and pyramid.config["config"] == "tiny-ddpm-ct"


def _unexplained(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    return float(((a - b) ** 2).sum() / (a**2).sum())


def test_a_points_descriptor_is_the_same_in_two_resamplings(tiny):
    """Two scans of one phantom (different voxel grids and axis order) agree where the geometry says.

    "Agree" means: less unexplained variance than one level voxel away in any direction. Finer claims do
    not hold for random networks, whose zero-padded borders make features depend a little on the frame.
    """
    weights_dir, config_path = tiny
    featurizer = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, spacing_mm=2.0)
    phantom = Phantom()
    first = Geometry.create((48, 48, 48), (2.0, 2.0, 2.0), (-47.0, -47.0, -47.0))
    permuted = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    second = Geometry.create((52, 48, 50), (1.7, 1.7, 1.7), (-41.3, -39.1, -46.7), permuted)
    pyramids = [featurizer.extract(phantom.volume(geometry)) for geometry in (first, second)]
    offset_mm = np.asarray(featurizer.model_grid(second).origin_lps_mm) - featurizer.model_grid(first).origin_lps_mm
    assert np.all(np.abs(np.remainder(offset_mm / 2.0, 1.0) - 0.5) < 0.45), "grids should differ by a fraction"
    points = np.random.default_rng(2).uniform(-22, 22, (300, 3))
    for level_a, level_b in zip(*(pyramid.levels for pyramid in pyramids)):
        reference = raw_descriptors(level_a, points)
        aligned = _unexplained(reference, raw_descriptors(level_b, points))
        for axis in range(3):
            step_mm = level_b.geometry.spacing_mm[axis] * level_b.geometry.direction_matrix[:, axis]
            for sign in (-1, 1):
                moved = points + sign * step_mm
                assert aligned < _unexplained(reference, raw_descriptors(level_b, moved)), (level_a.name, axis, sign)
        cosine = (sample_descriptors(level_a, points) * sample_descriptors(level_b, points)).sum(1)
        assert float(cosine.mean()) > 0.95


def test_extraction_is_deterministic_for_a_seed(tiny, featurizer):
    weights_dir, config_path = tiny
    volume = Phantom().volume(SMALL)
    first, again = featurizer.extract(volume), featurizer.extract(volume)
    assert all(torch.equal(a.features, b.features) for a, b in zip(first.levels, again.levels))

    def features(**options) -> list[torch.Tensor]:
        other = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, **options)
        return [level.features for level in other.extract(volume).levels]

    for options in ({"seed": 1}, {"latent": "sample"}, {"noise_draws": 2}, {"timestep": 200}):
        changed = features(**options)
        assert not torch.allclose(changed[-1], first.levels[-1].features), options
    assert all(torch.equal(a, b) for a, b in zip(features(noise_draws=2), features(noise_draws=2)))


def test_hooks_are_removed_after_extraction_and_after_cancel(featurizer):
    volume = Phantom().volume(SMALL)
    hooks_seen = []

    def progress(stage: str, fraction: float, message: str = "") -> None:
        if "decoder block" in message:
            hooks_seen.append(sum(len(block._forward_hooks) for block in featurizer.unet.up_blocks))
        if message == "MAISI: decoder block 1" and cancel:
            raise CancelledError("cancelled by the test")

    cancel = False
    featurizer.extract(volume, progress)
    assert hooks_seen and hooks_seen[0] == 4
    assert all(not block._forward_hooks for block in featurizer.unet.up_blocks)
    cancel = True
    with pytest.raises(CancelledError):
        featurizer.extract(volume, progress)
    assert all(not block._forward_hooks for block in featurizer.unet.up_blocks)


def test_rectified_flow_configuration_runs(tmp_path):
    config = tiny_config("rflow-ct")
    write_checkpoints(config, tmp_path)
    featurizer = maisi.MaisiFeaturizer(weights_dir=tmp_path, config=config, levels=(0, 3))
    pyramid = featurizer.extract(Phantom().volume(SMALL))
    grid = featurizer.model_grid(SMALL)
    assert [level.channels for level in pyramid.levels] == [32, 8]
    assert np.allclose(pyramid.levels[0].geometry.origin_lps_mm, grid.ijk_to_lps([[9.0, 9.0, 9.0]])[0])


def test_bf16_and_plain_attention_agree_with_the_default_cpu_path(tiny, featurizer):
    weights_dir, config_path = tiny
    volume = Phantom().volume(SMALL)
    reference = featurizer.extract(volume)
    plain = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, flash_attention=False)
    for a, b in zip(reference.levels, plain.extract(volume).levels):
        assert torch.allclose(a.features, b.features, atol=1e-4, rtol=1e-4)
    bf16 = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, precision="bf16")
    for a, b in zip(reference.levels, bf16.extract(volume).levels):
        cosine = torch.nn.functional.cosine_similarity(a.features.flatten(1), b.features.flatten(1), dim=0)
        assert float(cosine.mean()) > 0.97
    with pytest.raises(BadInputError, match="fp16 runs on CUDA only"):
        maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, precision="fp16")


def test_split_convolutions_are_exact_where_allowed(featurizer):
    assert maisi.safe_num_splits(8, 64, 2) == 4
    assert maisi.safe_num_splits(8, 256, 2) == 8
    assert maisi.safe_num_splits(8, 32, 2) == 2
    image = torch.rand(1, 1, 32, 64, 32)
    with torch.no_grad():
        maisi.set_num_splits(featurizer.autoencoder, 1)
        whole = featurizer.autoencoder.encode(image)[0]
        maisi.set_num_splits(featurizer.autoencoder, maisi.safe_num_splits(8, 64, 2))
        split = featurizer.autoencoder.encode(image)[0]
        maisi.set_num_splits(featurizer.autoencoder, 1)
    assert torch.allclose(whole, split, atol=1e-5)
    assert not torch.allclose(whole, torch.zeros_like(whole))


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_weights_name_the_files_and_the_commands(tiny, tmp_path):
    weights_dir, config_path = tiny
    with pytest.raises(MissingWeightsError) as raised:
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=config_path)
    message = str(raised.value)
    assert raised.value.kind == "missing_weights"
    for text in ("autoencoder_v1.pt", "diff_unet_3d_ddpm-ct.pt", "meddift weights download", "weights import FILE"):
        assert text in message
    shutil.copy(weights_dir / "autoencoder_v1.pt", tmp_path / "autoencoder_v1.pt")
    with pytest.raises(MissingWeightsError, match="found in .*: diff_unet_3d_ddpm-ct.pt;") as raised:
        create_featurizer("maisi", weights_dir=tmp_path, config=config_path)
    assert "autoencoder_v1.pt" not in str(raised.value).split(":")[1]
    present, status = maisi.MaisiFeaturizer.weights_status(weights_dir=tmp_path, config=config_path)
    assert not present and "diff_unet_3d_ddpm-ct.pt" in status
    assert maisi.MaisiFeaturizer.weights_status(weights_dir=weights_dir, config=config_path)[0]


def test_former_file_names_and_the_models_subfolder_are_found(tiny, tmp_path, monkeypatch):
    weights_dir, config_path = tiny
    (tmp_path / "models").mkdir()
    shutil.copy(weights_dir / "autoencoder_v1.pt", tmp_path / "models" / "autoencoder_epoch273.pt")
    shutil.copy(weights_dir / "diff_unet_3d_ddpm-ct.pt", tmp_path / "models" / "diff_unet_3d_ddpm.pt")
    monkeypatch.setenv("MEDDIFT_WEIGHTS_DIR", str(tmp_path))
    featurizer = create_featurizer("maisi", config=str(config_path))
    assert featurizer.config["config"] == "tiny-ddpm-ct" and featurizer.scale_factor == pytest.approx(1.3)


def test_checkpoints_that_do_not_fit_are_refused_with_their_keys(tiny, tmp_path):
    weights_dir, config_path = tiny
    v2 = tiny_config("rflow-ct")
    shutil.copy(weights_dir / "autoencoder_v1.pt", tmp_path / "autoencoder_v1.pt")
    shutil.copy(weights_dir / "diff_unet_3d_ddpm-ct.pt", tmp_path / "diff_unet_3d_rflow-ct.pt")
    with pytest.raises(BadInputError) as raised:
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=v2)
    message = str(raised.value)
    assert "missing keys (class_embedding.weight" in message and "unexpected keys" in message
    assert "use configuration ddpm-ct" in message

    shutil.copy(weights_dir / "autoencoder_v1.pt", tmp_path / "diff_unet_3d_rflow-ct.pt")
    with pytest.raises(BadInputError, match="found an autoencoder state dict, not a MAISI diffusion UNet"):
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=v2)
    shutil.copy(weights_dir / "diff_unet_3d_ddpm-ct.pt", tmp_path / "autoencoder_v1.pt")
    with pytest.raises(BadInputError, match="diffusion UNet checkpoint .*not an autoencoder"):
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=v2)

    wider = tiny_config()
    wider["autoencoder"]["latent_channels"] = 8
    with pytest.raises(BadInputError, match="size mismatch"):
        maisi.MaisiFeaturizer(weights_dir=weights_dir, config=wider)


def test_unreadable_and_unsafe_checkpoints_are_refused(tiny, tmp_path):
    weights_dir, config_path = tiny
    config = tiny_config()
    shutil.copy(weights_dir / "autoencoder_v1.pt", tmp_path / "autoencoder_v1.pt")
    (tmp_path / "diff_unet_3d_ddpm-ct.pt").write_bytes(b"<html>not found</html>")
    with pytest.raises(BadInputError, match="not a .*PyTorch checkpoint"):
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=config)
    write_checkpoints(config, tmp_path, unet_extra={"args": argparse.Namespace(lr=1.0)})
    with pytest.raises(BadInputError, match="weights_only"):
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=config)
    checkpoint = torch.load(weights_dir / "diff_unet_3d_ddpm-ct.pt", weights_only=True)
    del checkpoint["scale_factor"]
    torch.save(checkpoint, tmp_path / "diff_unet_3d_ddpm-ct.pt")
    with pytest.raises(BadInputError, match="no scale_factor"):
        maisi.MaisiFeaturizer(weights_dir=tmp_path, config=config)


def test_bad_options_are_rejected(tiny):
    weights_dir, config_path = tiny
    for options, pattern in (
        ({"top_region": "neck"}, "unknown body region"),
        ({"latent": "mode"}, "latent mode"),
        ({"timestep": 1000}, r"timestep must lie in \[0, 999\]"),
        ({"levels": (4,)}, "up-block indices"),
        ({"spacing_mm": -1.0}, "positive"),
        ({"device": "tpu"}, "device"),
        ({"noise_draws": 0}, "at least 1"),
    ):
        with pytest.raises(BadInputError, match=pattern):
            maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, **options)


def test_memory_check_and_out_of_memory_are_reported(tiny, monkeypatch):
    weights_dir, config_path = tiny
    featurizer = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path)
    volume = Phantom().volume(SMALL)
    monkeypatch.setattr(HOST_MEMORY, lambda: 1024)
    with pytest.raises(OutOfMemoryError, match="need about .* GiB of memory, 0.0 GiB are available") as raised:
        featurizer.extract(volume)
    assert raised.value.kind == "out_of_memory" and "coarser model spacing" in str(raised.value)
    monkeypatch.setattr(HOST_MEMORY, lambda: None)

    def exhausted(image):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9999999 bytes")

    monkeypatch.setattr(featurizer.autoencoder, "encode", exhausted)
    with pytest.raises(OutOfMemoryError, match="32x32x32 model grid"):
        featurizer.extract(volume)


# --- end to end ---------------------------------------------------------------------------------------------------


def test_matching_with_maisi_features_recovers_a_translation(tiny):
    """A moved copy of a scan gives the same features shifted: matches land on the moved points."""
    weights_dir, config_path = tiny
    featurizer = create_featurizer("maisi", weights_dir=weights_dir, config=config_path)
    fixed = Phantom().volume(SMALL)
    shift_lps = np.array([6.0, -4.0, 5.0])
    moved_geometry = Geometry.create(SMALL.shape_ijk, SMALL.spacing_mm, np.asarray(SMALL.origin_lps_mm) + shift_lps)
    moving = Volume(fixed.voxels, moved_geometry)
    points = fixed.geometry.ijk_to_lps([[15, 14, 13], [10, 12, 14], [18, 16, 10]])
    options = MatchOptions(search_radius_mm=12.0, exact=True)
    result = match_points(featurizer.extract(fixed), featurizer.extract(moving), points, options=options)
    assert np.allclose(result.points_lps_mm, points + shift_lps, atol=1.0)


def test_meddift_match_runs_with_maisi_and_reports_missing_weights(tiny, tmp_path, capsys):
    from MedDIFTLib import cli
    from MedDIFTLib.core.io import write_volume

    weights_dir, config_path = tiny
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    volume = Phantom().volume(SMALL)
    write_volume(volume, fixed)
    write_volume(
        Volume(volume.voxels, Geometry.create(SMALL.shape_ijk, SMALL.spacing_mm, (-24.0, -28.0, -32.0))), moving
    )
    points = tmp_path / "points.csv"
    points.write_text("label,l,p,s\nA,0.0,0.0,0.0\nB,-6.0,4.0,2.0\n")
    common = [str(fixed), str(moving), "--points", str(points), "--backbone", "maisi"]
    common += ["--backbone-option", f"config={config_path}"]
    out = tmp_path / "matches.csv"
    assert cli.main(["match", *common, "--out", str(out), "--weights-dir", str(weights_dir)]) == 0
    assert out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["match", *common, "--out", str(tmp_path / "x.csv"), "--weights-dir", str(empty)]) == 2
    assert "meddift weights download" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


# --- full size ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_size_networks_with_random_weights_on_cpu(tmp_path_factory, precision):
    folder = tmp_path_factory.getbasetemp() / "maisi_full_size"
    config = maisi.load_config("ddpm-ct")
    if not (folder / config["unet_file"]).exists():
        write_checkpoints(config, folder)
    featurizer = maisi.MaisiFeaturizer(weights_dir=folder, precision=precision)
    pyramid = featurizer.extract(Phantom().volume(SMALL))
    assert [level.channels for level in pyramid.levels] == [512, 256, 128, 64]
    assert [level.geometry.shape_ijk for level in pyramid.levels] == [(2, 2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8)]
    assert all(torch.isfinite(level.features).all() for level in pyramid.levels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_agrees_with_cpu(tiny, precision):
    weights_dir, config_path = tiny
    volume = Phantom().volume(SMALL)
    cpu = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path).extract(volume)
    cuda = maisi.MaisiFeaturizer(weights_dir=weights_dir, config=config_path, device="cuda", precision=precision)
    for a, b in zip(cpu.levels, cuda.extract(volume).levels):
        assert b.features.device.type == "cpu"
        cosine = torch.nn.functional.cosine_similarity(a.features.flatten(1), b.features.flatten(1), dim=0)
        assert float(cosine.mean()) > 0.97


def test_descriptor_sampling_helper_matches_the_matcher(featurizer):
    """raw_descriptors (used above) is the matcher's own trilinear sampling before normalisation."""
    level = featurizer.extract(Phantom().volume(SMALL)).levels[-1]
    points = np.array([[1.0, 2.0, 3.0], [-5.0, 4.0, 0.5]])
    expected = sample_descriptors(level, points)
    assert torch.allclose(torch.nn.functional.normalize(raw_descriptors(level, points), dim=1), expected, atol=1e-5)
