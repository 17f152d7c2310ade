"""Tests of common/losses/region_contrastive.py (RCL, Eq. 7 of HLWA-UNet, and the Dice + RCL objective)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceLoss

from common.losses.region_contrastive import (
    HLWALoss,
    RegionContrastiveLoss,
    masked_region_contrastive_loss,
    region_contrastive_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: OpenMP threads only add overhead (and spin when the CPU is busy) for tensors this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features_with_means(means: list[list[float]]) -> torch.Tensor:
    """(B, C, 2, 1, 2) features whose spatial mean is ``means[b]`` (the voxels are mean +- a zero-sum pattern)."""
    m = torch.tensor(means)[:, :, None, None, None]
    pattern = torch.tensor([1.0, -1.0, -2.0, 2.0]).view(1, 1, 2, 1, 2)
    return m + 0.3 * pattern


def test_global_rcl_equals_hand_computation():
    # sample 0: g(f_a) = (1, 0), g(f_b) = (1, 1), g(f_c) = (0, 1): cos+ = 1/sqrt(2), cos- = 0
    # sample 1: g(f_a) = (1, 0), g(f_b) = (0, 2), g(f_c) = (3, 0): cos+ = 0,         cos- = 1
    f_a = _features_with_means([[1.0, 0.0], [1.0, 0.0]])
    f_b = _features_with_means([[1.0, 1.0], [0.0, 2.0]])
    f_c = _features_with_means([[0.0, 1.0], [3.0, 0.0]])
    # tau = 0.5: -log(e^{s+} / (e^{s+} + e^{s-})) = 0.2176217 and 2.1269280, mean 1.1722749
    torch.testing.assert_close(region_contrastive_loss(f_a, f_b, f_c, tau=0.5), torch.tensor(1.1722749))
    # tau = 0.07: 4.1016097e-05 and 14.2857149, mean 7.1428780 (no overflow: exp(14.3) computed stably)
    torch.testing.assert_close(region_contrastive_loss(f_a, f_b, f_c), torch.tensor(7.1428780))
    s_pos, s_neg = (1 / math.sqrt(2)) / 0.07, 0.0
    expected0 = -math.log(math.exp(s_pos) / (math.exp(s_pos) + math.exp(s_neg)))
    torch.testing.assert_close(region_contrastive_loss(f_a[:1], f_b[:1], f_c[:1]), torch.tensor(expected0))


def test_global_rcl_is_lower_when_anchor_aligns_with_positive():
    torch.manual_seed(0)
    base = torch.randn(4, 8, 3, 3, 3)
    other = torch.randn(4, 8, 3, 3, 3)
    aligned_with_b = region_contrastive_loss(base, base * 2.0, other)
    aligned_with_c = region_contrastive_loss(base, other, base * 2.0)
    assert aligned_with_b < 0.1 < aligned_with_c
    assert aligned_with_c > 10.0  # s- - s+ is close to (1 - cos) / 0.07 for random directions


def test_rcl_is_stable_and_differentiable_at_extreme_scales():
    f_a = torch.full((2, 4, 2, 2, 2), 1e6, requires_grad=True)
    f_c = torch.full((2, 4, 2, 2, 2), 1e6)
    f_b = -f_c
    loss = region_contrastive_loss(f_a, f_b, f_c, tau=0.01)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(200.0, rel=1e-4)  # softplus(2 / 0.01)
    loss.backward()
    assert torch.isfinite(f_a.grad).all()


def test_masked_rcl_pools_tumour_and_background_on_a_hand_made_example():
    # features on a (2, 1, 1) grid: voxel 0 is tumour, voxel 1 background
    f_a = torch.tensor([[1.0, 0.0], [0.0, 5.0]]).T.reshape(1, 2, 2, 1, 1)  # tumour (1, 0), background (0, 5)
    f_b = torch.tensor([[1.0, 1.0], [-3.0, 0.0]]).T.reshape(1, 2, 2, 1, 1)  # tumour (1, 1)
    f_c = torch.tensor([[9.0, 9.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1, 1)  # background (0, 1)
    # the mask at twice the resolution along D (nearest resizing keeps rows 0 and 2), as 3 region channels
    mask = torch.zeros(1, 3, 4, 2, 2)
    mask[:, 2, :2] = 1  # only the ET channel marks the tumour: the union is used
    # pooled: a = (1, 0), b = (1, 1), c = (0, 1): cos+ = 1/sqrt(2), cos- = 0 -> 0.2176217 at tau = 0.5
    torch.testing.assert_close(masked_region_contrastive_loss(f_a, f_b, f_c, mask, tau=0.5), torch.tensor(0.2176217))
    # the global variant sees other means and gives another value
    assert abs(region_contrastive_loss(f_a, f_b, f_c, tau=0.5).item() - 0.2176217) > 0.1


def test_masked_rcl_with_empty_or_full_mask_falls_back_to_global_pooling():
    torch.manual_seed(0)
    f_a, f_b, f_c = (torch.randn(2, 4, 2, 2, 2) for _ in range(3))
    global_value = region_contrastive_loss(f_a, f_b, f_c)
    empty = torch.zeros(2, 1, 4, 4, 4)
    full = torch.ones(2, 1, 2, 2, 2)
    torch.testing.assert_close(masked_region_contrastive_loss(f_a, f_b, f_c, empty), global_value)
    # all tumour: f_a, f_b are pooled over everything anyway, f_c (no background) falls back to global
    torch.testing.assert_close(masked_region_contrastive_loss(f_a, f_b, f_c, full), global_value)
    # one sample empty, one not: finite, and only the non-empty sample differs from the global loss
    mixed = torch.zeros(2, 1, 2, 2, 2)
    mixed[1, 0, 0] = 1
    f_a.requires_grad_(True)
    loss = masked_region_contrastive_loss(f_a, f_b, f_c, mixed)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_a.grad).all()
    expected0 = region_contrastive_loss(f_a[:1], f_b[:1], f_c[:1])
    assert not torch.allclose(loss, global_value)
    assert torch.allclose(
        2 * loss - expected0, masked_region_contrastive_loss(f_a[1:], f_b[1:], f_c[1:], mixed[1:]), atol=1e-5
    )


def test_region_contrastive_loss_module_modes():
    torch.manual_seed(0)
    f_a, f_b, f_c = (torch.randn(2, 4, 2, 2, 2) for _ in range(3))
    mask = (torch.rand(2, 1, 2, 2, 2) > 0.5).float()
    torch.testing.assert_close(RegionContrastiveLoss()(f_a, f_b, f_c), region_contrastive_loss(f_a, f_b, f_c))
    torch.testing.assert_close(
        RegionContrastiveLoss("masked", tau=0.2)(f_a, f_b, f_c, mask),
        masked_region_contrastive_loss(f_a, f_b, f_c, mask, tau=0.2),
    )
    with pytest.raises(ValueError, match="needs the tumour mask"):
        RegionContrastiveLoss("masked")(f_a, f_b, f_c)
    with pytest.raises(ValueError, match="mode"):
        RegionContrastiveLoss("local")
    with pytest.raises(ValueError, match="tau"):
        RegionContrastiveLoss(tau=0.0)
    with pytest.raises(ValueError, match="same shape"):
        region_contrastive_loss(f_a, f_b, f_c[:, :2])
    with pytest.raises(ValueError, match="mask must be"):
        masked_region_contrastive_loss(f_a, f_b, f_c, mask[:1])


def test_hlwa_loss_with_tuple_and_with_tensor():
    torch.manual_seed(0)
    seg = torch.randn(2, 3, 8, 8, 8)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    f_a, f_b, f_c = (torch.randn(2, 4, 2, 2, 2) for _ in range(3))
    dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)(seg, target)
    loss = HLWALoss()
    torch.testing.assert_close(loss(seg, target), dice)
    torch.testing.assert_close(loss((seg, f_a, f_b, f_c), target), dice + 0.1 * region_contrastive_loss(f_a, f_b, f_c))
    torch.testing.assert_close(
        HLWALoss(rcl_weight=0.5, rcl_mode="masked")([seg, f_a, f_b, f_c], target),
        dice + 0.5 * masked_region_contrastive_loss(f_a, f_b, f_c, target.amax(1, keepdim=True)),
    )
    assert loss((seg, f_a, f_b, f_c), target) != loss(seg, target)
    with pytest.raises(ValueError, match=r"\(seg, f_a, f_b, f_c\)"):
        loss((seg, f_a), target)
    with pytest.raises(ValueError, match="rcl_weight"):
        HLWALoss(rcl_weight=-1.0)
