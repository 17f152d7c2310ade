"""Tests for common/data/synthetic/defects.py: each defect changes exactly what it says, in the real layout."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.labels import LABEL_CONVENTIONS
from common.data.synthetic.defects import (
    BENIGN_DEFECTS,
    DEFECTS,
    FATAL_DEFECTS,
    applicable_defects,
    eligible_cases,
    plant_defect,
)
from common.data.synthetic.write import LAYOUTS, write_synthetic_dataset

SHAPE = (16, 16, 18)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """layout -> (folder, case ids) of a small clean synthetic dataset, written once per module."""
    root = tmp_path_factory.mktemp("pristine")
    return {
        layout: (root / layout, write_synthetic_dataset(layout, str(root / layout), 4, SHAPE, seed=3, progress=False))
        for layout in LAYOUTS
    }


@pytest.fixture
def copy_of(pristine, tmp_path):
    def make(layout: str) -> tuple[Path, list[str]]:
        folder, cases = pristine[layout]
        shutil.copytree(folder, tmp_path / layout)
        return tmp_path / layout, cases

    return make


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file() and p.suffix == ".gz"
    }


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def test_defect_lists():
    assert set(BENIGN_DEFECTS) | set(FATAL_DEFECTS) == set(DEFECTS) and not set(BENIGN_DEFECTS) & set(FATAL_DEFECTS)
    assert set(applicable_defects("brats2021")) == set(DEFECTS) == set(applicable_defects("msd_task01"))
    assert set(DEFECTS) - set(applicable_defects("mosmed")) == {"missing_modality"}
    assert set(DEFECTS) - set(applicable_defects("adni_pairs")) == {"bad_label_values"}
    with pytest.raises(ValueError, match="unknown layout"):
        applicable_defects("brats2019")


@pytest.mark.parametrize(
    "layout, defect",
    [("brats2021", d) for d in FATAL_DEFECTS]
    + [
        ("msd_task01", "three_channels"),
        ("msd_task01", "all_zero"),
        ("msd_task01", "affine_mismatch"),
        ("mosmed", "nan"),
        ("mosmed", "affine_mismatch"),
        ("mosmed", "bad_label_values"),
        ("adni_pairs", "missing_modality"),
    ],
)
def test_fatal_defect_changes_only_its_file(copy_of, layout, defect):
    folder, cases = copy_of(layout)
    case = eligible_cases(layout, str(folder), defect)[0]
    before = digests(folder)
    originals = {p: load(p) for p in before}
    sizes = {p: os.path.getsize(p) for p in before}
    changed = plant_defect(layout, str(folder), case, defect, seed=1)
    after = digests(folder)
    assert len(changed) == 1
    (path,) = changed
    assert {p for p in before if after.get(p) != before[p]} == {path}  # nothing else touched
    assert case in path or (layout == "adni_pairs" and os.path.basename(os.path.dirname(path)) == case)
    if defect == "missing_modality":
        assert not os.path.exists(path) and (layout != "adni_pairs" or path.endswith("_FDG_MNI152.nii.gz"))
        return
    if defect == "truncated":
        assert os.path.getsize(path) == sizes[path] // 2
        with pytest.raises((EOFError, OSError, ValueError)):  # the gzip stream ends early
            load(path)[0].sum()
        return
    if defect == "not_nifti":
        assert Path(path).read_bytes().startswith(b"<!DOCTYPE html>")
        return
    old, old_affine = originals[path]
    new, new_affine = load(path)
    if defect == "three_channels":
        assert new.shape == (*SHAPE, 3)
        expected = old[..., :3] if old.ndim == 4 else np.stack([old] * 3, axis=-1)
        np.testing.assert_array_equal(new, expected)
    elif defect == "nan":
        assert new.dtype == np.float32 and int(np.isnan(new).sum()) == 5
        np.testing.assert_array_equal(new[~np.isnan(new)], old[~np.isnan(new)].astype(np.float32))
    elif defect == "affine_mismatch":
        np.testing.assert_array_equal(new, old)
        np.testing.assert_allclose(new_affine[:3, 3] - old_affine[:3, 3], old_affine[:3, 0], atol=1e-4)
        if layout in ("msd_task01", "mosmed"):  # the label moves, so that the image stays the grid of reference
            assert "labelsTr" in path or "masks" in path
    elif defect == "bad_label_values":
        allowed = (0, 1) if layout == "mosmed" else LABEL_CONVENTIONS[layout].values
        assert set(np.unique(new)) - set(allowed) and set(np.unique(old)) <= set(allowed)
        assert int((new != old).sum()) == 1
    elif defect == "all_zero":
        if old.ndim == 4:  # MSD: the T1gd channel (FLAIR, T1w, T1gd, T2w) only
            assert not new[..., 2].any() and old[..., 2].any()
            np.testing.assert_array_equal(np.delete(new, 2, axis=-1), np.delete(old, 2, axis=-1))
        else:
            assert not new.any() and old.any()
    if defect != "affine_mismatch":
        np.testing.assert_allclose(new_affine, old_affine)


def world_corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates of the outer voxel edges (the field of view)."""
    lo = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    hi = affine @ np.array([s - 0.5 for s in shape[:3]] + [1.0])
    return np.stack([lo[:3], hi[:3]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_ras_keeps_world_positions(copy_of, layout):
    folder, cases = copy_of(layout)
    before = {p: nib.as_closest_canonical(nib.load(p)) for p in digests(folder)}
    changed = plant_defect(layout, str(folder), cases[0], "non_ras")
    assert len(changed) >= 2 or layout == "mosmed"  # every file of the case (MosMed CT-0: the study only)
    for path in changed:
        img = nib.load(path)
        assert nib.aff2axcodes(img.affine) != nib.aff2axcodes(before[path].affine)
        canonical = nib.as_closest_canonical(img)  # back to RAS: identical data on the identical grid
        np.testing.assert_allclose(canonical.affine, before[path].affine, atol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), np.asanyarray(before[path].dataobj))


@pytest.mark.parametrize("layout", ["brats2023", "msd_task01", "mosmed"])
def test_smaller_than_roi_resamples_every_file(copy_of, layout):
    folder, _ = copy_of(layout)
    case = eligible_cases(layout, str(folder), "bad_label_values")[0]  # a case with a label
    before = {p: load(p) for p in digests(folder)}
    changed = plant_defect(layout, str(folder), case, "smaller_than_roi", min_size=(12, 10, 20))
    assert len(changed) >= 2 and (layout != "mosmed" or any("synthetic_truth" in p for p in changed))
    for path in changed:
        new, affine = load(path)
        old, old_affine = before[path]
        assert all(n < m for n, m in zip(new.shape[:3], (12, 10, 20))) and new.shape[3:] == old.shape[3:]
        np.testing.assert_allclose(world_corners(affine, new.shape), world_corners(old_affine, old.shape), atol=1e-4)
        assert new.dtype == old.dtype
        if "label" in path or "mask" in path or "seg" in path:  # nearest neighbour: no new label value
            assert set(np.unique(new)) <= set(np.unique(old))
    shapes = {load(p)[0].shape[:3] for p in changed}
    assert len(shapes) == 1  # consistently: the case stays on one grid


def test_anisotropic_triples_the_third_spacing(copy_of):
    folder, cases = copy_of("adni_pairs")
    before = {p: load(p) for p in digests(folder)}
    changed = plant_defect("adni_pairs", str(folder), cases[1], "anisotropic")
    assert len(changed) == 2
    for path in changed:
        new, affine = load(path)
        old_spacing = nib.affines.voxel_sizes(before[path][1])
        np.testing.assert_allclose(nib.affines.voxel_sizes(affine), old_spacing * [1, 1, 3], rtol=1e-6)
        assert new.shape == (SHAPE[0], SHAPE[1], SHAPE[2] // 3)


def test_errors_and_eligible_cases(copy_of):
    folder, cases = copy_of("mosmed")
    masked = eligible_cases("mosmed", str(folder), "bad_label_values")
    assert masked and set(masked) < set(cases)
    assert all((folder / "masks" / f"{c}_mask.nii.gz").is_file() for c in masked)
    unmasked = sorted(set(cases) - set(masked))[0]
    with pytest.raises(ValueError, match="has no label"):
        plant_defect("mosmed", str(folder), unmasked, "bad_label_values")
    with pytest.raises(ValueError, match="does not apply"):
        plant_defect("mosmed", str(folder), cases[0], "missing_modality")
    with pytest.raises(ValueError, match="unknown defect"):
        plant_defect("mosmed", str(folder), cases[0], "gremlins")
    with pytest.raises(ValueError, match="not found"):
        plant_defect("mosmed", str(folder), "study_9999", "nan")
    with pytest.raises(ValueError, match="min_size"):
        plant_defect("mosmed", str(folder), cases[0], "smaller_than_roi", min_size=(2, 8, 8))
    assert not [p for p in folder.rglob("*") if "partial" in p.name]  # no temporary file left behind
