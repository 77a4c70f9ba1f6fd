"""Weight registry, cache folder, download (from file:// URLs, no network), verification, import, and the CLI."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from MedDIFTLib import cli, weights
from MedDIFTLib.core.environment import child_environment
from MedDIFTLib.core.errors import BadInputError, MissingWeightsError
from MedDIFTLib.weights.download import url_request


def autoencoder_like(path: Path) -> Path:
    """A small file with the autoencoder checkpoint layout (plain state dict of encoder.* tensors)."""
    torch.save({"encoder.blocks.0.conv.conv.weight": torch.ones(2, 1, 3, 3, 3)}, path)
    return path


def unet_like(path: Path) -> Path:
    """A small file with the UNet checkpoint layout."""
    torch.save({"unet_state_dict": {"conv_in.conv.weight": torch.ones(2)}, "scale_factor": torch.tensor(1.0)}, path)
    return path


def digest(path: Path, kind: str) -> str:
    return hashlib.new(kind, path.read_bytes()).hexdigest()


@pytest.fixture
def fake_entry(monkeypatch, tmp_path):
    """Register ``tiny_ae.pt`` published at a file:// URL; returns a function setting its checksums."""
    published = autoencoder_like(tmp_path / "published_ae.pt")

    def register(md5: str | None = None, sha256: str | None = None, size: int | None = None):
        source = weights.WeightSource(published.as_uri(), "local", md5=md5, sha256=sha256, checksum_reference="test")
        entry = weights.WeightFile(
            name="tiny_ae.pt",
            role="autoencoder",
            configs=("tiny",),
            sources=(source,),
            former_names=("old_tiny_ae.pt",),
            size_bytes=size,
        )
        monkeypatch.setitem(weights.REGISTRY, entry.name, entry)
        return entry, published

    return register


@pytest.fixture
def weights_cli(monkeypatch):
    """Run ``meddift ...`` through the real entry point with only this subcommand registered."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("weights",))
    return cli.main


def test_registry_lists_the_official_files_with_only_published_checksums():
    v1 = weights.files_for_config("ddpm-ct")
    assert [entry.name for entry in v1] == ["autoencoder_v1.pt", "diff_unet_3d_ddpm-ct.pt"]
    assert [entry.name for entry in weights.files_for_config("rflow-ct")] == [
        "autoencoder_v1.pt",
        "diff_unet_3d_rflow-ct.pt",
    ]
    assert weights.registry_entry("autoencoder_epoch273.pt").name == "autoencoder_v1.pt"
    assert weights.registry_entry("diff_unet_3d_ddpm.pt").name == "diff_unet_3d_ddpm-ct.pt"
    for entry in weights.REGISTRY.values():
        assert entry.sources[0].url == f"https://huggingface.co/nvidia/NV-Generate-CT/resolve/main/models/{entry.name}"
        assert entry.size_bytes is None  # no publisher states the sizes
        for source in entry.sources:
            assert source.sha256 is None
            assert source.md5 is None or (source.label == "nvidia" and source.checksum_reference)
    assert weights.REGISTRY["autoencoder_v1.pt"].sources[1].md5 == "917cfb1e49631c8a713e3bb7c758fbca"
    with pytest.raises(BadInputError, match="unknown weight file"):
        weights.registry_entry("model.pt")
    with pytest.raises(BadInputError, match="no registered weights"):
        weights.files_for_config("ddpm-mr")


def test_weights_folder_comes_from_the_argument_the_environment_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDDIFT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert weights.default_weights_dir() == tmp_path / "cache" / "meddift" / "weights"
    monkeypatch.setenv("MEDDIFT_WEIGHTS_DIR", str(tmp_path / "mine"))
    assert weights.resolve_weights_dir() == tmp_path / "mine"
    assert weights.resolve_weights_dir(tmp_path / "given") == tmp_path / "given"


def test_files_are_found_under_former_names_and_in_a_models_subfolder(tmp_path):
    (tmp_path / "models").mkdir()
    autoencoder_like(tmp_path / "models" / "autoencoder_epoch273.pt")
    entry = weights.registry_entry("autoencoder_v1.pt")
    assert weights.find_weight_file(entry.all_names, tmp_path) == tmp_path / "models" / "autoencoder_epoch273.pt"
    assert weights.find_weight_file(["diff_unet_3d_ddpm-ct.pt"], tmp_path) is None


def test_download_writes_the_file_atomically_with_progress(fake_entry, tmp_path):
    entry, published = fake_entry(md5=digest(tmp_path / "published_ae.pt", "md5"))
    folder = tmp_path / "cache"
    reports = []
    def progress(stage: str, fraction: float, message: str = "") -> None:
        reports.append(fraction)

    path = weights.download_file("tiny_ae.pt", folder, progress=progress)
    assert path == folder / "tiny_ae.pt" and path.read_bytes() == published.read_bytes()
    assert reports and reports[-1] == pytest.approx(1.0)
    assert sorted(p.name for p in folder.iterdir()) == ["tiny_ae.pt"]


@pytest.mark.parametrize("checksum", ["md5", "sha256", "size"])
def test_a_download_that_fails_its_published_checksum_leaves_nothing(fake_entry, tmp_path, checksum):
    fake_entry(**{checksum: 12345 if checksum == "size" else "0" * 64})
    folder = tmp_path / "cache"
    with pytest.raises(BadInputError, match="nothing kept"):
        weights.download_file("tiny_ae.pt", folder)
    assert not folder.exists() or not any(folder.iterdir())


def test_download_failures_are_reported_as_missing_weights(fake_entry, tmp_path):
    fake_entry()

    def forbidden(request):
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, io.BytesIO())

    with pytest.raises(MissingWeightsError, match="HTTP 403.*HF_TOKEN"):
        weights.download_file("tiny_ae.pt", tmp_path, opener=forbidden)
    with pytest.raises(BadInputError, match="unknown source"):
        weights.download_file("tiny_ae.pt", tmp_path, source="mirror")
    assert not (tmp_path / "tiny_ae.pt").exists()


def test_huggingface_token_is_sent_to_huggingface_only(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert url_request("https://huggingface.co/x/y").get_header("Authorization") == "Bearer secret"
    assert url_request("https://developer.download.nvidia.com/x").get_header("Authorization") is None


def test_verify_reports_ok_unverified_mismatch_and_missing(fake_entry, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    assert weights.verify_file("autoencoder_v1.pt", folder).status == "missing"
    entry, published = fake_entry(md5=digest(tmp_path / "published_ae.pt", "md5"))
    (folder / "tiny_ae.pt").write_bytes(published.read_bytes())
    result = weights.verify_file("tiny_ae.pt", folder)
    assert result.status == "ok" and result.digests["sha256"] == digest(folder / "tiny_ae.pt", "sha256")
    fake_entry()
    assert weights.verify_file("tiny_ae.pt", folder).status == "unverified"
    fake_entry(md5="0" * 32)
    assert weights.verify_file("tiny_ae.pt", folder).status == "mismatch"
    fake_entry(sha256="0" * 64)
    assert weights.verify_file("tiny_ae.pt", folder).status == "mismatch"
    # the real autoencoder: the NVIDIA copy publishes an md5, the HuggingFace copy nothing
    autoencoder = weights.REGISTRY["autoencoder_v1.pt"]
    assert weights.check_digests(autoencoder, {"md5": "1" * 32, "sha256": "2" * 64})[0] == "unverified"
    assert weights.check_digests(autoencoder, {"md5": "917cfb1e49631c8a713e3bb7c758fbca"})[0] == "ok"
    fake_entry()
    unet_like(folder / "tiny_ae.pt")
    result = weights.verify_file("tiny_ae.pt", folder)
    assert result.status == "mismatch" and "not an autoencoder" in result.message


def test_import_copies_under_the_canonical_name_after_checking_the_file(fake_entry, tmp_path):
    fake_entry()
    folder = tmp_path / "cache"
    own = autoencoder_like(tmp_path / "old_tiny_ae.pt")
    assert weights.import_file(own, folder) == folder / "tiny_ae.pt"
    assert (folder / "tiny_ae.pt").read_bytes() == own.read_bytes()
    other = autoencoder_like(tmp_path / "my_download.pt")
    with pytest.raises(BadInputError, match="pass --as NAME"):
        weights.import_file(other, folder)
    assert weights.import_file(other, folder, name="tiny_ae.pt").exists()
    wrong = unet_like(tmp_path / "unet.pt")
    with pytest.raises(BadInputError, match="diffusion UNet checkpoint"):
        weights.import_file(wrong, tmp_path / "other", name="tiny_ae.pt")
    fake_entry(sha256="0" * 64)
    with pytest.raises(BadInputError, match="matches no published checksum"):
        weights.import_file(other, tmp_path / "other", name="tiny_ae.pt")
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    with pytest.raises(BadInputError, match="no such file"):
        weights.import_file(tmp_path / "absent.pt", folder)


def test_cli_list_path_import_verify(weights_cli, fake_entry, tmp_path, capsys):
    fake_entry()
    folder = tmp_path / "cache"
    assert weights_cli(["weights", "list", "--weights-dir", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "autoencoder_v1.pt" in listing and "missing" in listing
    assert "https://huggingface.co/nvidia/NV-Generate-CT/resolve/main/models/diff_unet_3d_ddpm-ct.pt" in listing
    assert "md5 917cfb1e49631c8a713e3bb7c758fbca" in listing

    assert weights_cli(["weights", "path", "--weights-dir", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert weights_cli(["weights", "path", "tiny_ae.pt", "--weights-dir", str(folder)]) == 1
    assert "meddift weights import FILE" in capsys.readouterr().err

    own = autoencoder_like(tmp_path / "old_tiny_ae.pt")
    assert weights_cli(["weights", "import", str(own), "--weights-dir", str(folder)]) == 0
    assert weights_cli(["weights", "path", "tiny_ae.pt", "--weights-dir", str(folder)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(folder / "tiny_ae.pt"))
    assert weights_cli(["weights", "verify", "--weights-dir", str(folder)]) == 0
    assert "tiny_ae.pt: unverified" in capsys.readouterr().out
    assert weights_cli(["weights", "verify", "autoencoder_v1.pt", "--weights-dir", str(folder)]) == 1
    assert weights_cli(["weights", "import", str(tmp_path / "nothing.pt"), "--weights-dir", str(folder)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_download_asks_first_and_downloads_with_yes(weights_cli, fake_entry, tmp_path, capsys, monkeypatch):
    fake_entry()
    folder = tmp_path / "cache"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert weights_cli(["weights", "download", "tiny_ae.pt", "--weights-dir", str(folder)]) == 2
    assert "confirmation" in capsys.readouterr().err and not folder.exists()
    assert weights_cli(["weights", "download", "tiny_ae.pt", "--yes", "--weights-dir", str(folder)]) == 0
    assert "saved to" in capsys.readouterr().out and (folder / "tiny_ae.pt").exists()
    assert weights_cli(["weights", "download", "tiny_ae.pt", "--yes", "--weights-dir", str(folder)]) == 0
    assert "already present" in capsys.readouterr().out


def test_the_weights_package_imports_no_torch():
    """Slicer's process reads the weights folder through this package, without torch."""
    code = "import sys, MedDIFTLib.weights; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_environment(), check=True
    )
    assert output.stdout.strip() == "[]"


def test_layout_checks_are_the_same_for_import_verify_and_loading(fake_entry, tmp_path):
    """A UNet checkpoint without a usable scale_factor is refused by every path that takes a file in."""
    for name, checkpoint in (
        ("no_scale.pt", {"unet_state_dict": {"conv_in.conv.weight": torch.ones(2)}}),
        ("bad_scale.pt", {"unet_state_dict": {"conv_in.conv.weight": torch.ones(2)}, "scale_factor": -1.0}),
    ):
        torch.save(checkpoint, tmp_path / name)
        with pytest.raises(BadInputError, match="scale_factor"):
            weights.load_checkpoint(tmp_path / name, "diffusion_unet")
        with pytest.raises(BadInputError, match="scale_factor"):
            weights.import_file(tmp_path / name, tmp_path / "folder", name="diff_unet_3d_ddpm-ct.pt")
    assert not (tmp_path / "folder").exists()
    checkpoint = weights.load_checkpoint(unet_like(tmp_path / "unet.pt"), "diffusion_unet")
    assert weights.scale_factor_of(checkpoint) == 1.0
    with pytest.raises(BadInputError, match="not an autoencoder state dict"):
        weights.load_checkpoint(tmp_path / "unet.pt", "autoencoder")
    with pytest.raises(BadInputError, match="found a dict, not a MAISI diffusion UNet"):
        weights.check_layout({"weight": torch.ones(1)}, "diffusion_unet", "x.pt")
