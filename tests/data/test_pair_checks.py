"""Tests of common/data/pair_checks.py (CheckSameGridd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data.pair_checks import CheckSameGridd
from common.errors import DataError


def _image(shape=(1, 6, 7, 5), affine=None, name="mri.nii.gz", value=1.0) -> MetaTensor:
    affine = np.diag([-2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    return MetaTensor(torch.full(shape, value), affine=torch.as_tensor(affine), meta={"filename_or_obj": name})


def test_a_registered_pair_passes_unchanged():
    data = {"mri": _image(), "pet": _image(name="pet.nii.gz"), "case": "c1"}
    out = CheckSameGridd(keys=["mri", "pet"])(data)
    assert out["mri"] is data["mri"] and out["pet"] is data["pet"] and out["case"] == "c1"


@pytest.mark.parametrize(
    "pet, message",
    [
        (_image(shape=(1, 6, 7, 6), name="pet.nii.gz"), "grid"),
        (_image(affine=np.diag([2.0, 2.0, 2.0, 1.0]), name="pet.nii.gz"), "affine differs"),
        (_image(shape=(3, 6, 7, 5), name="pet.nii.gz"), "one 3D volume"),
        (_image(name="pet.nii.gz", value=float("nan")), "NaN"),
    ],
)
def test_a_broken_pair_names_the_pet_file(pet, message):
    with pytest.raises(DataError, match=message) as err:
        CheckSameGridd(keys=["mri", "pet"])({"mri": _image(), "pet": pet})
    assert err.value.path == "pet.nii.gz"


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="channels"):
        CheckSameGridd(keys="mri", channels=0)
