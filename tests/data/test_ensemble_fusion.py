"""Tests for common/data/ensemble_fusion.py (fusing sampled masks: STAPLE or mean consensus, mean, uncertainty)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data.ensemble_fusion import FuseEnsembled


def _stack(samples: list[np.ndarray]) -> torch.Tensor:
    """(N, C, *spatial) list -> sample-major (N * C, *spatial) tensor."""
    array = np.stack(samples).astype(np.float32)
    return torch.from_numpy(array.reshape(-1, *array.shape[2:]))


def _blob(shape=(12, 14, 6)) -> np.ndarray:
    mask = np.zeros(shape, np.float32)
    mask[3:9, 4:11, 1:5] = 1
    return mask


def test_identical_samples_give_the_mask_and_zero_uncertainty():
    mask = _blob()[None]
    affine = torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0], dtype=torch.float64))
    stacked = MetaTensor(_stack([mask] * 5), affine=affine)
    out = FuseEnsembled("pred", num_samples=5)({"pred": stacked})
    for key in ("pred", "pred_mean", "pred_uncertainty"):
        assert isinstance(out[key], MetaTensor) and out[key].shape == (1, 12, 14, 6)
        torch.testing.assert_close(out[key].affine, affine)
    np.testing.assert_array_equal(out["pred"].numpy(), mask)
    np.testing.assert_array_equal(out["pred_mean"].numpy(), mask)
    assert out["pred_uncertainty"].abs().max() == 0


def test_uncertainty_is_zero_exactly_where_samples_agree():
    rng = np.random.default_rng(0)
    base = _blob()
    samples = []
    for _ in range(5):
        sample = base.copy()
        flips = rng.random(base.shape) < 0.05
        sample[flips] = 1 - sample[flips]
        samples.append(sample[None])
    samples[1][0, 0, 0, 0] = 1 - samples[1][0, 0, 0, 0]  # at least one disagreement
    stacked = np.stack(samples)[:, 0]
    agree = (stacked == stacked[0]).all(axis=0)
    out = FuseEnsembled("pred", 5, method="mean")({"pred": _stack(samples)})
    spread = out["pred_uncertainty"].numpy()[0]
    assert np.all(spread[agree] == 0) and np.all(spread[~agree] > 0)
    np.testing.assert_allclose(spread, stacked.std(axis=0), atol=1e-6)
    np.testing.assert_array_equal(out["pred"].numpy()[0], (stacked.mean(0) > 0.5).astype(np.float32))


def test_staple_outvotes_an_outlier_channel_by_channel():
    first, second = _blob(), np.roll(_blob(), 3, axis=0)
    good = np.stack([first, second])
    outlier = 1 - good
    out = FuseEnsembled("pred", 4, method="staple")({"pred": _stack([good, good, good, outlier])})
    np.testing.assert_array_equal(out["pred"].numpy(), good)
    torch.testing.assert_close(out["pred_mean"], torch.from_numpy(np.where(good > 0, 0.75, 0.25).astype(np.float32)))


def test_single_sample_is_its_own_consensus_and_outputs_can_be_skipped():
    mask = _blob()[None]
    out = FuseEnsembled("pred", 1, mean_postfix=None, uncertainty_postfix="_std")({"pred": _stack([mask])})
    assert set(out) == {"pred", "pred_std"}
    np.testing.assert_array_equal(out["pred"].numpy(), mask)
    assert out["pred_std"].abs().max() == 0


def test_invalid_arguments_and_inputs():
    with pytest.raises(ValueError, match="num_samples"):
        FuseEnsembled("pred", 0)
    with pytest.raises(ValueError, match="method"):
        FuseEnsembled("pred", 2, method="vote")
    with pytest.raises(ValueError, match="threshold"):
        FuseEnsembled("pred", 2, threshold=1.0)
    with pytest.raises(ValueError, match="multiple"):
        FuseEnsembled("pred", 2)({"pred": torch.zeros(3, 4, 4)})
    with pytest.raises(ValueError, match="binary"):
        FuseEnsembled("pred", 2)({"pred": torch.full((2, 4, 4), 0.5)})
