"""Tests for common/metrics/lesion.py against hand-counted examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.metrics.lesion import confusion_counts, lesion_metrics, metrics_from_counts, nanmean_metrics


def volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, Z) = (4, 4, 3): lung in x < 3 of slices 0 and 1, a lesion of 3 voxels (one outside the lung)."""
    lung = np.zeros((4, 4, 3), dtype=bool)
    lung[:3, :, :2] = True  # 12 lung voxels per slice in z = 0, 1; none in z = 2
    label = np.zeros_like(lung)
    label[0, 0, 0] = label[0, 1, 0] = True  # two lesion voxels in slice 0
    label[3, 0, 1] = True  # a lesion voxel the lung mask missed, slice 1
    pred = np.zeros_like(lung)
    pred[0, 0, 0] = True  # TP
    pred[1, 0, 0] = pred[1, 1, 0] = True  # two FP in slice 0
    return pred, label, lung


def test_confusion_counts_by_hand():
    pred, label, lung = volumes()
    c = confusion_counts(pred, label, lung)
    # region = 24 lung voxels + the missed lesion voxel = 25
    assert {k: int(v) for k, v in c.items()} == {"tp": 1, "fp": 2, "fn": 2, "tn": 20, "lesion": 3, "region": 25}
    per_slice = confusion_counts(torch.as_tensor(pred), label, lung.astype(np.float32), slice_axis=2)
    np.testing.assert_array_equal(per_slice["tp"], [1, 0, 0])
    np.testing.assert_array_equal(per_slice["fn"], [1, 1, 0])
    np.testing.assert_array_equal(per_slice["tn"], [8, 12, 0])
    np.testing.assert_array_equal(per_slice["region"], [12, 13, 0])


def test_metrics_by_hand_and_nan_for_empty_ratios():
    pred, label, lung = volumes()
    vol, slices = lesion_metrics(pred, label, lung, slice_axis=2)
    assert vol["dice"] == pytest.approx(2 / 6)  # 2 TP / (2 TP + FP + FN) with TP = 1, FP = 2, FN = 2
    assert vol["sensitivity"] == pytest.approx(1 / 3)
    assert vol["specificity"] == pytest.approx(20 / 22)
    assert vol["lesion_fraction"] == pytest.approx(3 / 25)
    np.testing.assert_array_equal(slices["slice"], [0, 1])  # slice 2 holds neither lung nor lesion
    np.testing.assert_allclose(slices["dice"], [2 / 5, 0.0])  # slice 0: TP 1, FP 2, FN 1; slice 1: FN 1 only
    np.testing.assert_allclose(slices["sensitivity"], [0.5, 0.0])
    np.testing.assert_allclose(slices["specificity"], [8 / 10, 1.0])
    np.testing.assert_allclose(slices["lesion_fraction"], [2 / 12, 1 / 13])
    empty = metrics_from_counts(confusion_counts(np.zeros(3), np.zeros(3), np.ones(3)))
    assert math.isnan(empty["dice"]) and math.isnan(empty["sensitivity"]) and empty["specificity"] == 1.0


def test_a_missed_lesion_voxel_lowers_sensitivity_and_dice():
    pred, label, lung = volumes()
    base, _ = lesion_metrics(pred, label, lung)
    worse = pred.copy()
    worse[0, 0, 0] = False  # the one true positive is missed
    after, _ = lesion_metrics(worse, label, lung)
    assert after["sensitivity"] < base["sensitivity"] and after["dice"] < base["dice"]
    assert after["specificity"] == base["specificity"]


def test_shape_mismatch_and_nanmean():
    with pytest.raises(ValueError, match="same shape"):
        confusion_counts(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="slice_axis"):
        confusion_counts(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), slice_axis=3)
    rows = [{"dice": 0.5, "sensitivity": float("nan"), "specificity": 1.0}, {"dice": 1.0, "specificity": 0.0}]
    assert nanmean_metrics(rows) == {"dice": 0.75, "sensitivity": None, "specificity": 0.5}
