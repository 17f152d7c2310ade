"""Unit tests of common/bundle/monailabel.py (app folder, pinned overrides, MONAI Label studies); no server.

The end-to-end test with MONAI Label servers is tests/integration/test_monailabel.py.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from common.bundle.monailabel import (
    LABELS_SUBDIR,
    monaibundle_app_source,
    pin_overrides,
    write_app,
    write_studies,
    write_study,
)
from common.data.writers import save_nifti
from common.errors import DataError

AFFINE = np.array([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])


def _volume(path, value_offset: float, affine=AFFINE, shape=(4, 5, 3)) -> str:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + value_offset
    return save_nifti(data, affine, str(path))


@pytest.fixture
def case(tmp_path):
    """A BraTS-like case: four modality files (channel i holds arange + 100 i) and a label."""
    files = [_volume(tmp_path / f"m{i}.nii.gz", 100.0 * i) for i in range(4)]
    label = np.zeros((4, 5, 3), dtype=np.uint8)
    label[1, 2, 1], label[2, 2, 1] = 4, 2
    label_path = save_nifti(label, AFFINE, str(tmp_path / "seg.nii.gz"), np.uint8)
    return files, label_path


def test_write_study_stacks_modalities_channels_last_with_the_first_affine(case, tmp_path):
    files, _ = case
    out = write_study(files, str(tmp_path / "study.nii.gz"))
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert data.shape == (4, 5, 3, 4)
    for i in range(4):
        np.testing.assert_array_equal(data[..., i], nib.load(files[i]).get_fdata())
    np.testing.assert_allclose(img.affine, AFFINE)


def test_write_study_reorders_channels(case, tmp_path):
    files, _ = case
    data = np.asarray(nib.load(write_study(files, str(tmp_path / "s.nii.gz"), channel_order=[2, 0, 3, 1])).dataobj)
    assert [float(data[0, 0, 0, c]) for c in range(4)] == [200.0, 0.0, 300.0, 100.0]
    with pytest.raises(ValueError, match="permutation"):
        write_study(files, str(tmp_path / "bad.nii.gz"), channel_order=[0, 0, 1, 2])


def test_write_study_refuses_modalities_on_different_grids(case, tmp_path):
    files, _ = case
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    other = _volume(tmp_path / "other.nii.gz", 0.0, affine=shifted)
    with pytest.raises(DataError, match="affine differs"):
        write_study([*files[:3], other], str(tmp_path / "s.nii.gz"))
    assert not os.path.exists(tmp_path / "s.nii.gz")


def test_write_studies_copies_only_the_chosen_labels(case, tmp_path):
    files, label = case
    items = [{"case": "a", "image": files, "label": label}, {"case": "b", "image": files, "label": label}]
    studies = tmp_path / "studies"
    assert write_studies(items, str(studies), with_labels=["a"]) == ["a", "b"]
    assert sorted(os.listdir(studies / LABELS_SUBDIR)) == ["a.nii.gz"]
    copied = np.asarray(nib.load(str(studies / LABELS_SUBDIR / "a.nii.gz")).dataobj)
    np.testing.assert_array_equal(copied, np.asarray(nib.load(label).dataobj))  # values unchanged (1/2/4 kept)
    assert nib.load(str(studies / "b.nii.gz")).shape == (4, 5, 3, 4)


def test_write_studies_with_labels_true_takes_every_item_holding_one(case, tmp_path):
    files, label = case
    items = [{"case": "a", "image": files, "label": label}, {"case": "b", "image": files[0]}]
    write_studies(items, str(tmp_path / "s"), with_labels=True)
    assert os.listdir(tmp_path / "s" / LABELS_SUBDIR) == ["a.nii.gz"]
    assert nib.load(str(tmp_path / "s" / "b.nii.gz")).shape == (4, 5, 3)  # a single 3D file stays 3D


def test_write_studies_errors(case, tmp_path):
    files, label = case
    with pytest.raises(DataError, match="no 'label'"):
        write_studies([{"case": "a", "image": files}], str(tmp_path / "s1"), with_labels=["a"])
    with pytest.raises(ValueError, match="unique"):
        write_studies([{"case": "a", "image": files}] * 2, str(tmp_path / "s2"))
    with pytest.raises(ValueError, match="not in items"):
        write_studies([{"case": "a", "image": files}], str(tmp_path / "s3"), with_labels=["z"])


def test_pin_overrides_writes_nested_ids_into_the_config(tmp_path):
    path = tmp_path / "inference.json"
    path.write_text(json.dumps({"roi_size": [128, 128], "network_def": {"_target_": "X", "channels": [32, 64]}}))
    pin_overrides(str(path), {"roi_size": [32, 32], "network_def#channels": [4, 8], "num_ensemble": 2})
    content = json.loads(path.read_text())
    assert content == {"roi_size": [32, 32], "network_def": {"_target_": "X", "channels": [4, 8]}, "num_ensemble": 2}
    with pytest.raises(KeyError, match="no 'missing'"):
        pin_overrides(str(path), {"missing#x": 1})
    assert json.loads(path.read_text()) == content  # a refused override leaves the file as it was


def test_write_app_copies_the_app_and_the_bundles_under_model(tmp_path):
    sample = tmp_path / "prefix" / "monailabel" / "sample-apps" / "monaibundle"
    sample.mkdir(parents=True)
    (sample / "main.py").write_text("# app\n")
    bundle = tmp_path / "bundles" / "my_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text("{}")
    source = monaibundle_app_source(str(tmp_path / "prefix"))
    app = write_app(str(tmp_path / "app"), [str(bundle)], source)
    assert os.path.isfile(os.path.join(app, "main.py"))
    assert os.path.isfile(os.path.join(app, "model", "my_bundle", "configs", "inference.json"))
    with pytest.raises(FileExistsError):
        write_app(app, [str(bundle)], source)
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        write_app(str(tmp_path / "app2"), [str(tmp_path / "bundles")], source)
    with pytest.raises(FileNotFoundError, match="monaibundle"):
        monaibundle_app_source(str(tmp_path / "empty"))
