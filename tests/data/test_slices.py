"""Tests for common/data/slices.py: slices of cached volumes and batches holding both classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data.slices import (
    BalancedClassBatchSampler,
    VolumeSliceDataset,
    in_plane_size,
    samples_per_volume,
    volume_roi_size,
)
from common.errors import DataError


def make_volumes() -> list[dict]:
    """Two (1, 4, 3, 3) volumes whose voxel values encode (volume, slice); lung in slices 1-2 / 0 only."""
    vols = []
    for v, lung_slices in enumerate(([1, 2], [0])):
        image = torch.zeros(1, 4, 3, 3)
        for z in range(4):
            image[:, z] = 10 * v + z
        lung = torch.zeros(1, 4, 3, 3)
        lung[:, lung_slices, 1, 1] = 1
        vols.append({"case": f"c{v}", "image": MetaTensor(image), "label": image > 11, "lung": lung})
    return vols


def test_slices_with_lung_and_their_content():
    ds = VolumeSliceDataset(make_volumes(), keys=("image", "label"), lung_key="lung")
    assert len(ds) == 3
    assert [(s["case"], s["slice"]) for s in ds] == [("c0", 1), ("c0", 2), ("c1", 0)]
    sample = ds[1]
    assert sample["image"].shape == (1, 3, 3) and type(sample["image"]) is torch.Tensor  # meta dropped
    assert torch.all(sample["image"] == 2) and not sample["label"].any()
    assert torch.all(ds[2]["image"] == 10) and not ds[2]["label"].any()
    assert len(VolumeSliceDataset(make_volumes(), keys="image")) == 8  # no selection: every slice


def test_slices_by_class_and_transform():
    classes = {"c0": [1, -1, 0, -1], "c1": [-1, -1, -1, 1]}
    flip = lambda d: {**d, "image": d["image"].flip(-1)}  # noqa: E731
    ds = VolumeSliceDataset(make_volumes(), keys=["image"], slice_classes=classes, transform=flip)
    assert [(s["case"], s["slice"], int(s["slice_class"])) for s in ds] == [("c0", 0, 1), ("c0", 2, 0), ("c1", 3, 1)]
    np.testing.assert_array_equal(ds.classes, [1, 0, 1])
    assert torch.all(ds[2]["image"] == 13)
    with pytest.raises(DataError, match="no slice classes"):
        VolumeSliceDataset(make_volumes(), keys=["image"], slice_classes={"c0": [0, 0, 0, 0]})
    with pytest.raises(DataError, match="4 slices"):
        VolumeSliceDataset(make_volumes(), keys=["image"], slice_classes={"c0": [0], "c1": [0]})
    with pytest.raises(ValueError, match="no slice selected"):
        VolumeSliceDataset(make_volumes(), keys=["image"], slice_classes={"c0": [-1] * 4, "c1": [-1] * 4})
    with pytest.raises(ValueError, match=r"\(C, Z, H, W\)"):
        VolumeSliceDataset([{"image": torch.zeros(4, 3, 3)}], keys=["image"])


def test_balanced_batches_hold_both_classes_without_repetition():
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 1, -1, 0])  # 4 high, 7 low, one ignored
    sampler = BalancedClassBatchSampler(labels, batch_size=4, seed=3)
    assert len(sampler) == 2  # min(4 // 2, 7 // 2)
    batches = list(sampler)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    for b in batches:
        assert sorted(labels[b].tolist()) == [0, 0, 1, 1]
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) and 10 not in flat
    assert list(sampler) != batches  # the next epoch is reshuffled
    sampler.set_epoch(0)
    assert list(sampler) == batches  # and an epoch's shuffle is reproducible


def test_balanced_sampler_shards_ranks_in_step_and_recycles_a_small_class():
    labels = np.array([1] * 5 + [0] * 9)
    ranks = [BalancedClassBatchSampler(labels, 4, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1  # min(5 // 2, 9 // 2) // 2 ranks
    seen = [set(i for b in s for i in b) for s in ranks]
    assert not seen[0] & seen[1]  # disjoint shares
    small = BalancedClassBatchSampler(np.array([1, 0, 0, 0, 0, 0]), batch_size=6, num_batches=2)
    for b in small:
        assert labels_count(b, np.array([1, 0, 0, 0, 0, 0])) == (3, 3)
    with pytest.raises(ValueError, match="both classes"):
        BalancedClassBatchSampler(np.zeros(5), 2)
    with pytest.raises(ValueError, match="batch_size"):
        BalancedClassBatchSampler(np.array([0, 1]), 1)


def labels_count(batch: list[int], labels: np.ndarray) -> tuple[int, int]:
    return int((labels[batch] == 1).sum()), int((labels[batch] == 0).sum())


def test_roi_sizes_of_a_2d_or_3d_network():
    # a 2D (H, W) network on axial slices: the volume is resized in-plane over its whole depth, cropped slice-wise
    assert volume_roi_size((256, 256), -1) == [256, 256, -1]
    assert volume_roi_size([256, 256], 1) == [256, 256, 1]
    assert samples_per_volume([256, 256], 4) == 4
    # a 3D network: the roi itself, one crop per volume
    assert volume_roi_size((96, 96, 64), -1) == volume_roi_size((96, 96, 64), 1) == [96, 96, 64]
    assert samples_per_volume([96, 96, 64], 4) == 1
    # SliceInferer along the first axis of a (D, H, W) grid
    assert in_plane_size([32, 128, 96]) == [128, 96]
