"""Tests of common/data/fusion_panel.py (the MRI | PET | fused PNG panel)."""

from __future__ import annotations

import os

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data.fusion_panel import SaveFusionPaneld, orthogonal_slices, save_fusion_panel


def test_orthogonal_slices_cut_through_the_centre_with_the_right_axes():
    vol = np.zeros((5, 6, 7))
    vol[1, 2, 5] = 1.0
    planes = orthogonal_slices(vol, centre=(1, 2, 5))
    assert planes["axial"].shape == (6, 5)  # (A, R) after the rotation: anterior up
    assert planes["coronal"].shape == (7, 5)
    assert planes["sagittal"].shape == (7, 6)
    assert all(p.sum() == 1.0 for p in planes.values())  # the marked voxel lies in all three planes
    assert all(p.sum() == 0.0 for p in orthogonal_slices(vol).values())  # the default centre (2, 3, 3) misses it
    assert planes["axial"][-1 - 2, 1] == 1.0  # rot90: row counts A from the top, column counts R


def test_panel_is_a_3_by_3_png_written_completely(tmp_path):
    mri = np.zeros((16, 18, 14), dtype=np.float32)
    mri[4:12, 4:14, 3:11] = 1.0
    path = save_fusion_panel(mri, 0.5 * mri, 0.75 * mri, str(tmp_path / "case_panel.png"), title="case")
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert sorted(os.listdir(tmp_path)) == ["case_panel.png"]  # no partial file left behind
    with pytest.raises(ValueError, match="share one shape"):
        save_fusion_panel(mri, mri[:-1], mri, str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()


def test_transform_writes_one_panel_per_case_and_passes_data_through(tmp_path):
    vol = MetaTensor(torch.rand(1, 8, 8, 8))
    data = {"pred": vol, "mri": vol, "pet": vol, "case": "I123"}
    out = SaveFusionPaneld(keys="pred", output_dir=str(tmp_path))(data)
    assert out["pred"] is vol and out["pred_panel"] == str(tmp_path / "I123_panel.png")
    assert os.path.isfile(out["pred_panel"])
    with pytest.raises(KeyError, match="case id"):
        SaveFusionPaneld(keys="pred", output_dir=str(tmp_path))({"pred": vol, "mri": vol, "pet": vol})
