"""Tests of common/bundle/montage.py: the case's Dice per region, the legend, and panels large enough to read."""

from __future__ import annotations

import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

import common.bundle.montage as montage
from common.bundle.montage import MIN_PANEL_PIXELS, case_dice, make_montage

BRATS_REGIONS = {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}


def test_case_dice_per_region_and_mean():
    label = np.zeros((10, 10, 4), dtype=np.uint8)
    label[2:6, 2:6, 1] = 2  # 16 edema voxels
    label[3:5, 3:5, 1] = 4  # 4 enhancing voxels inside
    output = label.copy()
    output[3:5, 3:5, 1] = 1  # enhancing predicted as necrotic core
    output[7, 7, 1] = 2  # one false-positive edema voxel
    dice = case_dice(label, output, BRATS_REGIONS)
    assert dice["TC"] == pytest.approx(2 * 4 / (4 + 4))
    assert dice["WT"] == pytest.approx(2 * 16 / (16 + 17))
    assert dice["ET"] == 0.0
    assert dice["mean"] == pytest.approx((dice["TC"] + dice["WT"] + dice["ET"]) / 3)
    assert case_dice(label, output, {"absent": [3]}) == {"absent": 1.0, "mean": 1.0}  # empty in both


def test_montage_is_upsampled_and_names_the_labels_and_the_dice(tmp_path, monkeypatch):
    affine = np.diag([2.5, 2.5, 2.5, 1.0])
    image = np.random.default_rng(0).random((48, 48, 20)).astype(np.float32)
    label = np.zeros((48, 48, 20), dtype=np.uint8)
    label[10:30, 10:30, 5:15] = 2
    label[15:25, 15:25, 8:12] = 1
    label[18:22, 18:22, 9:11] = 4
    output = label.copy()
    output[30:34, 10:30, 5:15] = 2
    for name, array in (("t1c", image), ("flair", image), ("seg", label)):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "out").mkdir()
    nib.save(nib.Nifti1Image(output, affine), str(tmp_path / "out" / "case0_seg.nii.gz"))
    datalist = tmp_path / "datalist.json"
    item = {"case": "case0", "image": ["t1c.nii.gz", "flair.nii.gz"], "label": "seg.nii.gz"}
    datalist.write_text(json.dumps({"testing": [item]}))
    spec = {
        "images": [{"key": "image", "file": 0, "title": "T1c"}, {"key": "image", "file": 1, "title": "FLAIR"}],
        "label": "label",
        "output": "{case}_seg.nii.gz",
        "kind": "mask",
        "legend": {"1": "necrotic core (TC)", "2": "edema (WT)", "4": "enhancing (ET)"},
        "regions": BRATS_REGIONS,
    }
    drawn = {}
    real_suptitle, real_legend = montage.plt.Figure.suptitle, montage.plt.Figure.legend

    def suptitle(fig, text, **kwargs):
        drawn["title"] = text
        return real_suptitle(fig, text, **kwargs)

    def legend(fig, *args, **kwargs):
        drawn["legend"] = [h.get_label() for h in kwargs["handles"]]
        return real_legend(fig, *args, **kwargs)

    monkeypatch.setattr(montage.plt.Figure, "suptitle", suptitle)
    monkeypatch.setattr(montage.plt.Figure, "legend", legend)
    png = make_montage(spec, str(tmp_path), str(datalist), str(tmp_path / "out"), str(tmp_path / "m.png"), "hlwa")
    dice = case_dice(label, output, BRATS_REGIONS)
    assert f"WT {dice['WT']:.2f}" in drawn["title"] and f"mean {dice['mean']:.2f}" in drawn["title"]
    assert "TC 1.00" in drawn["title"] and "case case0" in drawn["title"]
    assert drawn["legend"] == ["1: necrotic core (TC)", "2: edema (WT)", "4: enhancing (ET)"]
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width >= 4 * 350 and height >= 350  # four panels (T1c, FLAIR, reference, output), each readable
    # a small demo grid is upsampled for display: label maps by nearest neighbour, so their values stay labels
    shown = montage._upsample(label[:, :, 10], nearest=True)
    assert max(shown.shape) >= MIN_PANEL_PIXELS and set(np.unique(shown)) == set(np.unique(label[:, :, 10]))
