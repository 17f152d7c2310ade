"""Tests for common/metrics/ensemble.py: STAPLE (ITK), multi-label STAPLE, ensemble mean and uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.metrics.ensemble import ensemble_mean, ensemble_uncertainty, multilabel_staple, staple


def _square(shape=(20, 24)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[5:15, 6:18] = 1
    return mask


def _noisy_copies(truth: np.ndarray, count: int, flip: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    copies = []
    for _ in range(count):
        copy = truth.copy()
        flips = rng.random(truth.shape) < flip
        copy[flips] = 1 - copy[flips]
        copies.append(copy)
    return copies


def test_uncertainty_zero_where_samples_agree_positive_where_not():
    samples = np.zeros((5, 6, 7), np.float32)
    samples[:, 1:3, 1:3] = 1.0  # every sample agrees
    samples[:2, 4, 5] = 1.0  # 2 of 5 samples say foreground
    uncertainty = ensemble_uncertainty(samples)
    assert isinstance(uncertainty, np.ndarray) and uncertainty.shape == (6, 7)
    disagree = np.zeros((6, 7), bool)
    disagree[4, 5] = True
    assert np.all(uncertainty[~disagree] == 0)
    np.testing.assert_allclose(uncertainty[4, 5], np.sqrt(0.4 * 0.6))
    np.testing.assert_allclose(ensemble_mean(samples)[4, 5], 0.4)

    tensor_uncertainty = ensemble_uncertainty(torch.from_numpy(samples))
    assert isinstance(tensor_uncertainty, torch.Tensor)
    np.testing.assert_allclose(tensor_uncertainty.numpy(), uncertainty, atol=1e-7)
    listed = ensemble_mean([torch.from_numpy(s) for s in samples])
    assert isinstance(listed, torch.Tensor)
    np.testing.assert_allclose(listed.numpy(), samples.mean(0), atol=1e-7)


def test_staple_of_identical_masks_returns_the_mask():
    truth = _square()
    consensus, probability = staple([truth] * 4)
    assert isinstance(consensus, np.ndarray) and consensus.dtype == truth.dtype
    np.testing.assert_array_equal(consensus, truth)
    np.testing.assert_allclose(probability, truth.astype(np.float64), atol=1e-6)


def test_staple_3d_torch_returns_torch():
    truth = torch.zeros(6, 8, 10, dtype=torch.bool)
    truth[1:5, 2:6, 3:8] = True
    consensus, probability = staple(torch.stack([truth] * 3))
    assert isinstance(consensus, torch.Tensor) and consensus.dtype == torch.bool
    assert probability.dtype == torch.float32 and probability.shape == truth.shape
    assert torch.equal(consensus, truth)


def test_staple_outvotes_a_single_outlier():
    truth = _square()
    masks = _noisy_copies(truth, 4, flip=0.02, seed=0) + [1 - truth]
    consensus, probability = staple(masks)
    np.testing.assert_array_equal(consensus, truth)
    assert probability[truth == 1].min() > 0.5 > probability[truth == 0].max()


def test_staple_weights_raters_by_performance_unlike_majority_vote():
    """Two perfect raters and three independently noisy ones: STAPLE trusts the two, majority voting does not."""
    truth = np.zeros((32, 32), np.uint8)
    truth[8:24, 6:20] = 1
    masks = [truth, truth] + _noisy_copies(truth, 3, flip=0.3, seed=1)
    majority = (np.mean(masks, axis=0) > 0.5).astype(np.uint8)
    assert (majority != truth).sum() > 5  # where the three noisy raters all flipped
    consensus, _ = staple(masks)
    np.testing.assert_array_equal(consensus, truth)


def test_staple_degenerate_all_empty_returns_empty_without_nan():
    consensus, probability = staple(np.zeros((3, 5, 5), np.uint8))
    assert consensus.sum() == 0 and np.isfinite(probability).all()


def test_staple_rejects_bad_input():
    with pytest.raises(ValueError, match="binary"):
        staple(np.full((3, 4, 4), 2))
    with pytest.raises(ValueError, match="at least two"):
        staple(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        staple([np.zeros((4, 4)), np.zeros((4, 5))])


def test_multilabel_staple_of_identical_maps_returns_the_map():
    labels = np.zeros((6, 8, 10), np.int16)
    labels[1:5, 2:7, 2:9] = 1
    labels[2:4, 3:5, 4:6] = 2
    labels[0, 0, 0] = 3
    consensus, posterior = multilabel_staple([labels] * 4)
    assert consensus.dtype == labels.dtype
    np.testing.assert_array_equal(consensus, labels)
    assert posterior.shape == (4, 6, 8, 10)
    np.testing.assert_allclose(posterior, np.eye(4)[labels].transpose(3, 0, 1, 2), atol=1e-6)


def test_multilabel_staple_matches_itk_binary_staple():
    masks = _noisy_copies(_square(), 5, flip=0.1, seed=2)
    consensus, probability = staple(masks)
    ml_consensus, posterior = multilabel_staple(masks)
    np.testing.assert_allclose(posterior[1], probability, atol=1e-3)
    np.testing.assert_array_equal(ml_consensus, consensus)


def test_multilabel_staple_weights_raters_by_performance():
    rng = np.random.default_rng(3)
    truth = np.zeros((30, 30), np.int64)
    truth[5:25, 5:25] = 1
    truth[10:20, 10:20] = 2
    noisy = [np.where(rng.random(truth.shape) < 0.6, rng.integers(0, 3, truth.shape), truth) for _ in range(3)]
    label_maps = torch.from_numpy(np.stack([truth, truth, *noisy]))
    plurality = np.stack([(label_maps.numpy() == k).sum(0) for k in range(3)]).argmax(0)
    assert (plurality != truth).sum() > 10  # where the noisy raters outvote the good ones
    consensus, posterior = multilabel_staple(label_maps)
    assert isinstance(consensus, torch.Tensor) and consensus.dtype == torch.int64
    assert torch.equal(consensus, torch.from_numpy(truth))
    torch.testing.assert_close(posterior.sum(0), torch.ones(30, 30))


def test_multilabel_staple_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        multilabel_staple(np.full((2, 3, 3), -1))
    with pytest.raises(ValueError, match="integer"):
        multilabel_staple(np.full((2, 3, 3), 0.5))
