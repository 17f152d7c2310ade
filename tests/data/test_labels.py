"""Tests for common/data/labels.py: region definitions, round trips, value checks, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from common.data.labels import (
    BRAIN_MODALITIES,
    LABEL_CONVENTIONS,
    MSD_TO_STANDARD,
    LabelsToRegionsd,
    RegionsToLabelsd,
    ReorderChannelsd,
    check_binary_mask,
    check_label_values,
    labels_to_regions,
    region_names_of,
    regions_to_labels,
    select_regions,
)
from common.errors import DataError

# one voxel per label value; expected (TC, WT, ET) membership of each voxel
HAND_MADE = {
    "brats2021": ([0, 1, 2, 4], [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
    "brats2023": ([0, 1, 2, 3], [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
    "msd_task01": ([0, 1, 2, 3], [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
}


def random_label(convention: str, shape=(5, 6, 7), seed=0) -> np.ndarray:
    values = np.array(LABEL_CONVENTIONS[convention].values)
    return np.random.default_rng(seed).choice(values, size=shape).astype(np.uint8)


@pytest.mark.parametrize("convention", sorted(HAND_MADE))
def test_region_definitions_on_hand_made_map(convention):
    values, expected = HAND_MADE[convention]
    label = np.array(values, dtype=np.int16).reshape(1, 2, 2)  # (1, H, W): channel-first 2D map
    regions = labels_to_regions(label, convention)
    assert regions.shape == (3, 2, 2) and regions.dtype == bool
    np.testing.assert_array_equal(regions.reshape(3, 4), np.array(expected, dtype=bool))


def test_label_1_meaning_differs_between_brats_and_msd():
    one = np.ones((2, 2, 2), dtype=np.uint8)
    np.testing.assert_array_equal(labels_to_regions(one, "brats2021")[:, 0, 0, 0], [True, True, False])
    np.testing.assert_array_equal(labels_to_regions(one, "msd_task01")[:, 0, 0, 0], [False, True, False])
    # label 4 is enhancing only in 2021; label 3 is enhancing in 2023 and MSD
    assert not labels_to_regions(one * 4, "brats2023").any()
    assert labels_to_regions(one * 3, "brats2023")[2].all()


@pytest.mark.parametrize("convention", sorted(LABEL_CONVENTIONS))
@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("channel", [False, True])
def test_round_trip_exact(convention, as_torch, channel):
    label = random_label(convention)
    x = label[None] if channel else label
    x = torch.as_tensor(x) if as_torch else x
    regions = labels_to_regions(x, convention, dtype=torch.float32 if as_torch else np.float32)
    assert regions.shape == (3, *label.shape)
    assert isinstance(regions, torch.Tensor) == as_torch
    back = regions_to_labels(regions, convention, keepdim=False)
    back = back.numpy() if as_torch else back
    np.testing.assert_array_equal(back, label)


def test_regions_to_labels_priority_and_threshold():
    # voxels: ET only; TC only; WT only; TC+WT; nothing; probabilities below / above threshold
    regions = np.array(
        [
            [0, 1, 0, 1, 0, 0.4, 0.9],  # TC
            [0, 0, 1, 1, 0, 0.4, 0.9],  # WT
            [1, 0, 0, 0, 0, 0.4, 0.2],  # ET
        ],
        dtype=np.float32,
    )
    out = regions_to_labels(regions, "brats2021")
    assert out.shape == (1, 7) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [4, 1, 2, 1, 0, 0, 1])
    np.testing.assert_array_equal(regions_to_labels(regions, "msd_task01")[0], [3, 2, 1, 2, 0, 0, 2])
    np.testing.assert_array_equal(regions_to_labels(regions, "brats2021", threshold=0.3)[0], [4, 1, 2, 1, 0, 4, 1])


def test_regions_to_labels_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(3, \*spatial\)"):
        regions_to_labels(np.zeros((2, 4, 4)), "brats2021")


def test_unknown_convention():
    with pytest.raises(ValueError, match="brats2021"):
        labels_to_regions(np.zeros((2, 2, 2)), "brats2019")


def test_check_label_values_message():
    label = np.zeros((4, 4, 4), dtype=np.float32)
    check_label_values(label + np.isin(np.arange(4), [1, 2, 4]), "brats2021", "seg.nii.gz")
    label[0, 0, 0] = 5
    with pytest.raises(DataError) as info:
        check_label_values(label, "brats2021", "case/seg.nii.gz")
    assert str(info.value) == "case/seg.nii.gz: unexpected label values [5] for brats2021 (expected 0, 1, 2, 4)"
    with pytest.raises(DataError, match=r"\[3\] for brats2021"):
        check_label_values(np.array([0, 3]), "brats2021", "x")
    with pytest.raises(DataError, match=r"\[4\] for brats2023 \(expected 0, 1, 2, 3\)"):
        check_label_values(torch.tensor([0, 1, 4]), "brats2023", "x")
    with pytest.raises(DataError, match=r"\[0.5\] for msd_task01"):
        check_label_values(np.array([0.5, 3.0]), "msd_task01", "x")


def test_check_binary_mask():
    check_binary_mask(np.array([0, 1, 1]), "m.nii.gz")
    with pytest.raises(DataError, match=r"m.nii.gz: unexpected label values \[2\] for a binary mask"):
        check_binary_mask(np.array([0, 1, 2]), "m.nii.gz")


def test_dict_transforms_keep_meta_and_invert():
    label = random_label("brats2021", shape=(4, 5, 6))
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    mt = MetaTensor(torch.as_tensor(label)[None], affine=affine, meta={"filename_or_obj": "seg.nii.gz"})
    out = LabelsToRegionsd("label", "brats2021", dtype=torch.float32)({"label": mt, "other": 1})
    regions = out["label"]
    assert isinstance(regions, MetaTensor) and regions.shape == (3, 4, 5, 6) and regions.dtype == torch.float32
    torch.testing.assert_close(regions.affine, affine.double())
    assert regions.meta["filename_or_obj"] == "seg.nii.gz" and out["other"] == 1
    back = RegionsToLabelsd("label", "brats2021")(out)["label"]
    assert isinstance(back, MetaTensor) and back.shape == (1, 4, 5, 6)
    torch.testing.assert_close(back.affine, affine.double())
    np.testing.assert_array_equal(back[0].numpy(), label)


def test_reorder_msd_to_standard():
    msd_names = ("flair", "t1", "t1c", "t2")  # MSD file channels FLAIR, T1w, T1gd, T2w
    assert tuple(msd_names[i] for i in MSD_TO_STANDARD) == BRAIN_MODALITIES
    image = MetaTensor(torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 2, 2).clone(), affine=torch.eye(4) * 2)
    out = ReorderChannelsd("image", MSD_TO_STANDARD)({"image": image})["image"]
    assert isinstance(out, MetaTensor)
    np.testing.assert_array_equal(out[:, 0, 0, 0].numpy(), [2, 1, 3, 0])
    torch.testing.assert_close(out.affine, image.affine)
    np_out = ReorderChannelsd("image", [1, 0])({"image": np.stack([np.zeros(3), np.ones(3)])})["image"]
    np.testing.assert_array_equal(np_out[:, 0], [1, 0])


def test_reorder_validation():
    with pytest.raises(ValueError, match="permutation"):
        ReorderChannelsd("image", (0, 0, 1, 2))
    with pytest.raises(ValueError, match="4 channels"):
        ReorderChannelsd("image", MSD_TO_STANDARD)({"image": torch.zeros(3, 2, 2, 2)})


def test_transforms_from_bundle_config():
    config = {
        "imports": ["$from common.data.labels import MSD_TO_STANDARD"],
        "to_regions": {"_target_": "common.data.labels.LabelsToRegionsd", "keys": "label", "convention": "msd_task01"},
        "reorder": {
            "_target_": "common.data.labels.ReorderChannelsd",
            "keys": "image",
            "order": "$MSD_TO_STANDARD",
        },
    }
    parser = ConfigParser(config)
    parser.parse()
    assert parser.get_parsed_content("reorder").order == MSD_TO_STANDARD
    out = parser.get_parsed_content("to_regions")({"label": np.full((1, 2, 2, 2), 1)})["label"]
    np.testing.assert_array_equal(out[:, 0, 0, 0], [False, True, False])


def test_reorder_channels_none_is_identity():
    img = torch.arange(4 * 2 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2, 2)
    out = ReorderChannelsd(keys="image", order=None)({"image": img})["image"]
    assert torch.equal(out, img)


def test_region_names_and_select_regions():
    assert region_names_of([1]) == ["WT"]
    assert region_names_of([2, 0]) == ["ET", "TC"]
    regions = MetaTensor(torch.arange(3 * 2 * 2).reshape(3, 2, 2), meta={"filename_or_obj": "a.nii.gz"})
    wt = select_regions([1])(regions)
    assert wt.shape == (1, 2, 2) and torch.equal(wt[0], regions[1]) and wt.meta["filename_or_obj"] == "a.nii.gz"
    assert torch.equal(select_regions([2, 0])(regions), regions[[2, 0]])
    np.testing.assert_array_equal(select_regions((0,))(regions.numpy()), regions.numpy()[:1])
