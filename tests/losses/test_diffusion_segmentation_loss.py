"""Tests for common/losses/diffusion_segmentation.py (MedSegDiff noise MSE + optional Dice on the predicted x_0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from common.losses.diffusion_segmentation import DiffusionSegmentationLoss


def _halves(batch: int = 2, channels: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    eps, eps_hat = torch.randn(batch, channels, size, size), torch.randn(batch, channels, size, size)
    x0 = (torch.rand(batch, channels, size, size) > 0.5).float() * 2 - 1
    x0_hat = torch.randn(batch, channels, size, size) * 2
    return torch.cat([eps_hat, x0_hat], 1), torch.cat([eps, x0], 1)


def test_default_is_the_papers_noise_mse():
    pred, target = _halves(channels=2)
    torch.testing.assert_close(DiffusionSegmentationLoss()(pred, target), F.mse_loss(pred[:, :2], target[:, :2]))
    changed = pred.clone()
    changed[:, 2:] = 0.0  # the x0 half does not count by default
    torch.testing.assert_close(DiffusionSegmentationLoss()(changed, target), DiffusionSegmentationLoss()(pred, target))


def test_auxiliary_dice_on_the_clamped_x0_estimate():
    pred, target = _halves()
    dice = DiceLoss(smooth_nr=1e-5, smooth_dr=1e-5)((pred[:, 1:].clamp(-1, 1) + 1) / 2, (target[:, 1:] + 1) / 2)
    expected = F.mse_loss(pred[:, :1], target[:, :1]) + 0.5 * dice
    torch.testing.assert_close(DiffusionSegmentationLoss(x0_weight=0.5)(pred, target), expected)
    perfect = pred.clone()
    perfect[:, 1:] = target[:, 1:] * 3  # beyond [-1, 1]: clamped back to the true mask
    aux = DiffusionSegmentationLoss(x0_weight=1.0)(perfect, target) - F.mse_loss(pred[:, :1], target[:, :1])
    assert abs(aux.item()) < 1e-4


def test_invalid_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        DiffusionSegmentationLoss(x0_weight=-1.0)
    pred, target = _halves()
    with pytest.raises(ValueError, match="halves"):
        DiffusionSegmentationLoss()(pred[:, :1], target[:, :1].repeat(1, 1, 1, 1)[:, :, :4])
    with pytest.raises(ValueError, match="halves"):
        DiffusionSegmentationLoss()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
