"""Tests of common/metrics/ssim.py: the separable SSIM map equals MONAI's and scikit-image's SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs
from skimage.metrics import structural_similarity

from common.metrics.ssim import gaussian_window_1d, separable_ssim_map


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return x, (0.7 * x + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def test_window_is_monais_normalised_sampled_gaussian():
    w = gaussian_window_1d(11, 1.5, torch.float64)
    assert w.shape == (11,) and w.sum().item() == pytest.approx(1.0)
    assert w[0] / w[5] == pytest.approx(np.exp(-(5**2) / (2 * 1.5**2)))
    torch.testing.assert_close(w, w.flip(0))


@pytest.mark.parametrize("shape, win", [((2, 1, 13, 15, 12), 11), ((1, 3, 24, 19), 11), ((1, 2, 9, 10, 8), 7)])
def test_map_equals_monai_compute_ssim_and_cs(shape, win):
    x, y = _pair(shape)
    dims = len(shape) - 2
    expected, _ = compute_ssim_and_cs(
        y_pred=x, y=y, spatial_dims=dims, kernel_size=[win] * dims, kernel_sigma=[1.5] * dims, data_range=1.0
    )
    got = separable_ssim_map(x.float(), y.float(), win_size=win)
    assert got.shape == expected.shape == (*shape[:2], *[s - win + 1 for s in shape[2:]])
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-5)  # both float32 (MONAI always casts)


def test_float64_map_matches_scikit_image_exactly():
    x, y = _pair((1, 1, 14, 16, 12), seed=3)
    expected = structural_similarity(
        x[0, 0].numpy(), y[0, 0].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    # scikit-image averages the map over the region not touched by the window border: the same valid region
    assert separable_ssim_map(x, y).mean().item() == pytest.approx(expected, abs=1e-10)
    assert separable_ssim_map(x, x).mean().item() == pytest.approx(1.0, abs=1e-12)


def test_invalid_inputs_are_rejected():
    x = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        separable_ssim_map(x, x)
    with pytest.raises(ValueError, match="share one"):
        separable_ssim_map(x, x[..., :-1], win_size=3)
    with pytest.raises(ValueError, match="positive"):
        gaussian_window_1d(0, 1.0)


def test_numpy_path_equals_the_float64_torch_path():
    x, y = _pair((2, 2, 13, 12, 14), seed=5)
    expected = separable_ssim_map(x, y, win_size=7)
    got = separable_ssim_map(x.numpy(), y.numpy(), win_size=7)
    assert isinstance(got, np.ndarray) and got.shape == tuple(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-12)
