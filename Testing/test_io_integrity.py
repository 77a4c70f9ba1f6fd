"""A volume reader proves it read the whole file: truncated or damaged files, headers that promise
more voxels than the file holds, NaN voxels in NIfTI, DICOM series with a gap and impossible
geometry are refused with one clear line, never read as zeros."""

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.io import read_volume


def _ct(path, size=(24, 20, 16), spacing=(1.5, 1.5, 2.5), pixel_type=np.int16):
    """A noise CT whose every voxel differs from zero, written with SimpleITK."""
    rng = np.random.default_rng(0)
    voxels = rng.integers(100, 1000, size[::-1]).astype(pixel_type)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), path.name.endswith(".gz"))
    return voxels


def test_a_truncated_nii_gz_is_refused_not_read_as_zeros(tmp_path):
    """SimpleITK reads the missing part of a cut .nii.gz as zeros; the gzip stream's end proves it is gone."""
    path = tmp_path / "ct.nii.gz"
    _ct(path, size=(64, 64, 32))
    data = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="cut.nii.gz: the compressed file is damaged or truncated"):
        read_volume(cut)
    cut.write_bytes(data[:-4])  # only the length field of the gzip trailer missing
    with pytest.raises(BadInputError, match="truncated"):
        read_volume(cut)


def test_a_nii_gz_with_a_damaged_byte_fails_its_crc(tmp_path):
    path = tmp_path / "ct.nii.gz"
    _ct(path, size=(64, 64, 32))
    data = bytearray(path.read_bytes())
    data[-12] ^= 0x01  # inside the compressed voxels, near the end
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="damaged.nii.gz: the compressed file is damaged or truncated"):
        read_volume(damaged)


def test_a_truncated_uncompressed_nii_is_refused(tmp_path):
    path = tmp_path / "ct.nii"
    _ct(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BadInputError, match=r"ct.nii: the file is truncated: it holds \d+ bytes of voxels where its "
                       "header declares 15360"):
        read_volume(path)


def test_a_header_promising_more_voxels_than_the_file_can_hold_is_refused_before_allocating(tmp_path):
    """A NIfTI header of 1024^3 float32 voxels (4 GiB), gzip-compressed to about 100 bytes."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 1024, 1024, 1024, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 16, 32)  # float32
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(bytes(header) + bytes(4)))
    assert path.stat().st_size < 200
    with pytest.raises(BadInputError, match=r"bomb.nii.gz: its header declares 1024x1024x1024 voxels \(4.0 GiB\) but "
                       r"the file has only \d+ bytes"):
        read_volume(path)


@pytest.mark.parametrize("name", ["nan.nii", "nan.nii.gz"])
def test_nan_and_infinite_voxels_in_nifti_are_refused_as_in_every_format(tmp_path, name):
    """ITK's NIfTI reader turns NaN and infinity into 0; the reader counts them in the file itself."""
    voxels = np.ones((6, 7, 8), np.float32)
    voxels[1, 2, 3] = np.nan
    voxels[4, 5, 6] = -np.inf
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # what ITK alone reads
    with pytest.raises(BadInputError, match="2 voxels are NaN or infinite"):
        read_volume(path)


def test_float64_big_endian_nifti_is_scanned_in_its_own_byte_order(tmp_path):
    """A big-endian float64 NIfTI (written by hand) with one NaN: read right, and refused."""
    values = np.arange(4 * 5 * 6, dtype=">f8").reshape(6, 5, 4)
    header = bytearray(348)
    struct.pack_into(">i", header, 0, 348)
    struct.pack_into(">8h", header, 40, 3, 4, 5, 6, 1, 1, 1, 1)
    struct.pack_into(">hh", header, 70, 64, 64)
    struct.pack_into(">8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into(">f", header, 108, 352.0)
    struct.pack_into(">f", header, 112, 1.0)  # scl_slope
    header[344:348] = b"n+1\0"
    path = tmp_path / "big_endian.nii"
    path.write_bytes(bytes(header) + bytes(4) + values.tobytes())
    np.testing.assert_array_equal(read_volume(path).voxels, values.astype(np.float32))
    values[3, 2, 1] = np.nan
    path.write_bytes(bytes(header) + bytes(4) + values.tobytes())
    with pytest.raises(BadInputError, match="1 voxels are NaN or infinite"):
        read_volume(path)


def _write_dicom_series(folder, positions_mm, size=(6, 5)):
    voxels = (np.arange(size[0] * size[1]).reshape(size[::-1]) % 200).astype(np.int16)
    for number, position in enumerate(positions_mm):
        image = sitk.GetImageFromArray(voxels[None])
        image.SetSpacing((0.7, 0.7, 1.0))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(number + 1),
            "0020|0032": f"-20.0000\\10.0000\\{position:.4f}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": "5.0",
            "0028|0030": "0.7\\0.7",
        }.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{number:03d}.dcm"))
        writer.Execute(image)


def test_a_dicom_series_with_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    """SimpleITK would read it with 5.08 mm slices instead of 5 (its warning hidden): every distance wrong."""
    positions = [30.0 + 5.0 * n for n in range(13) if n != 7]
    _write_dicom_series(tmp_path, positions)
    with pytest.raises(BadInputError, match=r"slices are not evenly spaced: 1 of its 11 gaps differ from 5 mm, the "
                       r"first between slices 7 and 8 \(10 mm\) \(1 missing slice\?\)"):
        read_volume(tmp_path)


def test_a_dicom_series_mixing_slice_spacings_is_refused(tmp_path):
    _write_dicom_series(tmp_path, [0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0])
    with pytest.raises(BadInputError, match="not evenly spaced: 3 of its 7 gaps differ from 2.5 mm"):
        read_volume(tmp_path)


def test_an_evenly_spaced_dicom_series_still_reads(tmp_path):
    _write_dicom_series(tmp_path, [30.0 + 5.0 * n for n in range(8)])
    volume = read_volume(tmp_path)
    assert volume.geometry.shape_ijk == (6, 5, 8)
    np.testing.assert_allclose(volume.geometry.spacing_mm, (0.7, 0.7, 5.0), atol=1e-4)


@pytest.mark.parametrize("direction, message", [
    ((2, 0, 0, 0, 2, 0, 0, 0, 2), "not orthonormal"),  # a scaled direction: spacing in the wrong place
    ((1, 0.3, 0, 0, 1, 0, 0, 0, 1), "not orthonormal"),  # sheared
])
def test_a_non_orthonormal_direction_is_refused_on_load(tmp_path, direction, message):
    path = tmp_path / "skewed.mha"
    image = sitk.Image([8, 8, 8], sitk.sitkInt16)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    with pytest.raises(BadInputError, match=message):
        read_volume(path)


def test_an_absurd_spacing_is_refused_on_load(tmp_path):
    path = tmp_path / "huge.mha"
    image = sitk.Image([8, 8, 8], sitk.sitkInt16)
    image.SetSpacing((1e300, 1.0, 1.0))
    sitk.WriteImage(image, str(path))
    with pytest.raises(BadInputError, match="voxel spacing .* must be finite, between 0.0001 and 10000 mm"):
        read_volume(path)


@pytest.mark.parametrize("name", ["ok.nii.gz", "ok.nii", "ok.nrrd", "ok.mha"])
def test_whole_files_of_every_format_still_read_exactly(tmp_path, name):
    voxels = _ct(tmp_path / name)
    loaded = read_volume(tmp_path / name)
    np.testing.assert_array_equal(loaded.voxels, voxels.astype(np.float32))
    assert loaded.stored_dtype == "int16"
