"""The generators and the datalist tool agree: every synthetic case of every layout is found, with the right
files, and every file reads with nibabel and ITK on the same grid."""

import os

import itk
import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import LAYOUTS, build_datalist
from common.data.synthetic.write import write_synthetic_dataset

LISTS = ("training", "validation", "testing")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_datalist_finds_every_synthetic_case(tmp_path, layout):
    n = 7 if layout == "mosmed" else 4
    cases = write_synthetic_dataset(layout, str(tmp_path), num_cases=n, shape=(24, 24, 16), seed=1, progress=False)
    datalist = build_datalist(layout, str(tmp_path), seed=0, progress=False)
    items = [item for key in LISTS for item in datalist[key]]
    found = sorted(item["subject" if layout == "adni_pairs" else "case"] for item in items)
    if layout == "msd_task01":  # imagesTs cases come on top of the training cases the writer returns
        assert set(cases) <= set(found)
    else:
        assert found == sorted(cases)
    assert all(datalist[key] for key in LISTS)
    for item in items:
        for key in ("image", "label", "mri", "pet"):
            for rel in item.get(key, []) if isinstance(item.get(key), list) else [item[key]] if key in item else []:
                path = os.path.join(str(tmp_path), rel)
                nib_shape = nib.load(path).shape
                itk_shape = tuple(reversed(itk.size(itk.imread(path))))  # ITK sizes are x, y, z(, t)
                assert sorted(nib_shape) == sorted(itk_shape), (path, nib_shape, itk_shape)
    if layout.startswith("brats"):
        assert all(
            len(item["image"]) == 4 and item["image"][0].endswith(("_t1ce.nii.gz", "-t1c.nii.gz")) for item in items
        )
    if layout == "mosmed":
        assert not any("label" in item for item in datalist["training"])
        assert all(item["category"].startswith("CT-") for item in items)
    if layout == "adni_pairs":
        assert all(
            np.allclose(
                nib.load(os.path.join(str(tmp_path), i["mri"])).affine,
                nib.load(os.path.join(str(tmp_path), i["pet"])).affine,
            )
            for i in items
        )
