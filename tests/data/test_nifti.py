"""Tests for common/data/nifti.py: every damaged or unexpected file is a DataError naming it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common.data.nifti import check_same_grid, load_nifti
from common.errors import DataError


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def ramp(shape=(8, 8, 6)):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_reads_data_affine_header(tmp_path):
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 2]
    path = save(tmp_path / "img.nii.gz", ramp().astype(np.int16), affine)
    data, aff, header = load_nifti(path, ndim=3)
    assert data.dtype == np.float32 and data.shape == (8, 8, 6)
    np.testing.assert_array_equal(data, ramp())
    np.testing.assert_allclose(aff, affine)
    assert header.get_zooms() == (1.5, 2.0, 3.0)
    assert load_nifti(path, dtype=np.int32)[0].dtype == np.int32


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.nii.gz: file not found"):
        load_nifti(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("content", [b"this is a text file\n" * 20, b"\x89PNG\r\n\x1a\n" + bytes(300), b""])
def test_not_a_nifti(tmp_path, content):
    path = tmp_path / "fake.nii.gz"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_nifti(path)
    assert str(info.value).startswith(f"{path}: not a readable NIfTI file")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_file(tmp_path, name):
    # random values do not compress, so half of the bytes keeps the header and cuts the data
    full = save(tmp_path / f"full_{name}", np.random.default_rng(0).random((8, 8, 8), dtype=np.float32))
    raw = full.read_bytes()
    path = tmp_path / name
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        load_nifti(path, ndim=3)
    assert str(info.value).startswith(f"{path}: truncated or corrupt image data")
    assert "\n" not in str(info.value)


def test_wrong_dimensionality_and_channels(tmp_path):
    path3 = save(tmp_path / "three.nii.gz", ramp())
    with pytest.raises(DataError) as info:
        load_nifti(path3, ndim=4, channels=4)
    assert str(info.value) == f"{path3}: expected a 4D image with 4 channels, got 3D shape (8, 8, 6)"
    path4 = save(tmp_path / "four.nii.gz", np.zeros((8, 8, 6, 3), np.float32))
    with pytest.raises(
        DataError, match=r"four.nii.gz: expected a 4D image with 4 channels, got 4D shape \(8, 8, 6, 3\)"
    ):
        load_nifti(path4, ndim=4, channels=4)
    with pytest.raises(DataError, match=r"expected a 3D image, got 4D"):
        load_nifti(path4, ndim=3)
    with pytest.raises(DataError, match=r"expected a 4D image with 4 channels"):
        load_nifti(path4, channels=4)
    assert load_nifti(path4, ndim=(3, 4))[0].shape == (8, 8, 6, 3)


def test_trailing_singleton_axis_dropped_only_when_needed(tmp_path):
    path = save(tmp_path / "single.nii.gz", np.zeros((8, 8, 6, 1), np.float32))
    assert load_nifti(path, ndim=3)[0].shape == (8, 8, 6)
    assert load_nifti(path, ndim=4, channels=1)[0].shape == (8, 8, 6, 1)


def test_nan_and_inf(tmp_path):
    data = ramp()
    data.flat[:12] = np.nan
    path = save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataError) as info:
        load_nifti(path)
    assert str(info.value) == f"{path}: contains 12 NaN values"
    data.flat[20:23] = np.inf
    save(path, data)
    with pytest.raises(DataError, match="contains 12 NaN and 3 infinite values"):
        load_nifti(path)
    assert np.isnan(load_nifti(path, allow_nonfinite=True)[0]).sum() == 12


def test_same_grid(tmp_path):
    a = save(tmp_path / "a.nii.gz", ramp())
    b = save(tmp_path / "b.nii.gz", ramp() * 2)
    four = save(tmp_path / "four.nii.gz", np.zeros((8, 8, 6, 4), np.float32))
    check_same_grid([a, b, four])
    shifted = np.eye(4)
    shifted[0, 3] = 5e-4  # below atol
    check_same_grid([a, save(tmp_path / "near.nii.gz", ramp(), shifted)])
    shifted[0, 3] = 2.0
    c = save(tmp_path / "c.nii.gz", ramp(), shifted)
    with pytest.raises(DataError) as info:
        check_same_grid([a, b, c])
    assert str(c) in str(info.value) and str(a) in str(info.value) and "affine differs" in str(info.value)
    d = save(tmp_path / "d.nii.gz", ramp((8, 8, 7)))
    with pytest.raises(DataError) as info:
        check_same_grid([a, d])
    assert str(info.value) == f"{d}: spatial shape (8, 8, 7) differs from (8, 8, 6) of {a}"
    with pytest.raises(DataError, match="absent.nii.gz: file not found"):
        check_same_grid([a, tmp_path / "absent.nii.gz"])


def test_same_grid_accepts_images():
    a = nib.Nifti1Image(ramp(), np.eye(4))
    b = nib.Nifti1Image(ramp(), np.diag([2.0, 1.0, 1.0, 1.0]))
    check_same_grid([a, a])
    with pytest.raises(DataError, match=r"<image 1>: affine differs from that of <image 0>"):
        check_same_grid([a, b])
