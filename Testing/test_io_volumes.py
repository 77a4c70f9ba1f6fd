"""Volume I/O keeps LPS geometry and rejects unusable images with a clear message."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.io import Volume, check_volume_output, read_volume, write_volume


def _image(geometry, values=None):
    voxels = np.arange(np.prod(geometry.shape_kji), dtype=np.float32).reshape(geometry.shape_kji) if values is None \
        else values
    return Volume(voxels, geometry)


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry(tmp_path, oblique_geometry, extension):
    volume = _image(oblique_geometry)
    path = tmp_path / f"volume{extension}"
    write_volume(volume, path)
    loaded = read_volume(path)
    assert loaded.geometry.same_grid(oblique_geometry)
    np.testing.assert_array_equal(loaded.voxels, volume.voxels)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_dicom_folder(tmp_path):
    """A DICOM series folder (one file per slice) reads back with its spacing and origin."""
    size, spacing, origin = (6, 5, 4), (0.7, 0.7, 2.0), (-20.0, 10.0, 30.0)
    voxels = (np.arange(np.prod(size)).reshape(size[::-1]) % 200).astype(np.int16)
    for k in range(size[2]):
        slice_image = sitk.GetImageFromArray(voxels[k : k + 1])
        slice_image.SetSpacing(spacing)
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing[2]),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    loaded = read_volume(tmp_path)
    assert loaded.geometry.shape_ijk == size
    np.testing.assert_allclose(loaded.geometry.spacing_mm, spacing, atol=1e-4)
    np.testing.assert_allclose(loaded.geometry.origin_lps_mm, origin, atol=1e-4)
    np.testing.assert_array_equal(loaded.voxels, voxels)


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadInputError, match="cannot read as an image"):
        read_volume(path)


def test_2d_image_rejected(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(path))
    with pytest.raises(BadInputError, match="3D"):
        read_volume(path)


def test_single_slice_volume_rejected(tmp_path):
    path = tmp_path / "thin.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(path))
    with pytest.raises(BadInputError, match="2D slice"):
        read_volume(path)


def test_nan_voxels_rejected(tmp_path, oblique_geometry):
    """NRRD keeps NaN on disk (ITK's NIfTI writer does not), so the check is exercised for real."""
    values = np.zeros(oblique_geometry.shape_kji, np.float32)
    values[2, 3, 4] = np.nan
    path = tmp_path / "nan.nrrd"
    write_volume(_image(oblique_geometry, values), path)
    with pytest.raises(BadInputError, match="1 voxels are NaN"):
        read_volume(path)


def test_vector_image_rejected(tmp_path):
    path = tmp_path / "vector.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(path))
    with pytest.raises(BadInputError, match="scalar"):
        read_volume(path)


def test_unwritable_outputs_are_refused_before_writing(tmp_path, oblique_geometry):
    volume = _image(oblique_geometry)
    regular_file = tmp_path / "file.txt"
    regular_file.write_text("x")
    cases = {
        tmp_path / "volume.unknownformat": "must end in .nii.gz",
        tmp_path / "warped.png": "must end in .nii.gz",
        regular_file / "under.nii.gz": "is a file, not a folder",
    }
    (tmp_path / "folder.nii.gz").mkdir()
    cases[tmp_path / "folder.nii.gz"] = "is a folder"
    for path, message in cases.items():
        with pytest.raises(BadInputError, match=message):
            write_volume(volume, path)
        with pytest.raises(BadInputError, match=message):
            check_volume_output(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder.nii.gz"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nobody may create files")
def test_a_folder_nobody_may_write_is_refused():
    for path in ("/proc/out.nii.gz", "/proc/new_folder/out.nii.gz"):
        with pytest.raises(BadInputError, match="cannot write in /proc"):
            check_volume_output(path)


def test_outputs_follow_the_umask_and_keep_an_existing_mode(tmp_path, oblique_geometry):
    volume = _image(oblique_geometry)
    previous = os.umask(0o022)
    try:
        write_volume(volume, tmp_path / "new.nrrd")
        assert stat.S_IMODE((tmp_path / "new.nrrd").stat().st_mode) == 0o644
        os.umask(0o077)
        write_volume(volume, tmp_path / "private.nrrd")
        assert stat.S_IMODE((tmp_path / "private.nrrd").stat().st_mode) == 0o600
        os.chmod(tmp_path / "new.nrrd", 0o640)
        write_volume(volume, tmp_path / "new.nrrd")
        assert stat.S_IMODE((tmp_path / "new.nrrd").stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_unreadable_inputs_give_one_clean_line(tmp_path, capfd):
    not_image = tmp_path / "notes.nii.gz"
    not_image.write_text("not an image")
    with pytest.raises(BadInputError) as raised:
        read_volume(not_image)
    assert "not an image format" in str(raised.value) and ".cxx" not in str(raised.value)
    empty = tmp_path / "dicom"
    empty.mkdir()
    with pytest.raises(BadInputError, match="folder is empty"):
        read_volume(empty)
    assert capfd.readouterr().err == ""


def test_content_hash_follows_voxels_and_geometry(oblique_geometry):
    first = _image(oblique_geometry)
    same = _image(oblique_geometry)
    changed = _image(oblique_geometry, first.voxels + 1)
    assert first.content_hash() == same.content_hash() != changed.content_hash()


def test_a_volume_is_written_back_in_the_type_its_file_held(tmp_path, oblique_geometry):
    values = np.arange(np.prod(oblique_geometry.shape_kji), dtype=np.int16).reshape(oblique_geometry.shape_kji)
    write_volume(Volume(values.astype(np.float32), oblique_geometry), tmp_path / "ct.nrrd", sitk.sitkInt16)
    ct = read_volume(tmp_path / "ct.nrrd")
    assert ct.stored_dtype == "int16" and ct.voxels.dtype == np.float32
    derived = Volume(ct.voxels + 0.6, ct.geometry, stored_dtype=ct.stored_dtype)
    write_volume(derived, tmp_path / "derived.nrrd")
    image = sitk.ReadImage(str(tmp_path / "derived.nrrd"))
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values + 1)
    write_volume(Volume(ct.voxels + 0.6, ct.geometry), tmp_path / "float.nrrd")
    assert sitk.ReadImage(str(tmp_path / "float.nrrd")).GetPixelID() == sitk.sitkFloat32
