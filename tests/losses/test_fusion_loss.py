"""Tests of common/losses/fusion.py (DC2FusionLoss)."""

from __future__ import annotations

import pytest
import torch
from monai.losses import SSIMLoss

from common.losses.fusion import DC2FusionLoss, SeparableSSIMLoss


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _textured(seed: int = 0, shape=(1, 1, 16, 16, 16)) -> torch.Tensor:
    """A smooth random volume in [0.1, 0.9]: textured everywhere, so local correlations are well defined."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.rand(shape, generator=g), 3, stride=1, padding=1, count_include_pad=False)
    return 0.1 + 0.8 * (x - x.min()) / (x.max() - x.min())


def test_loss_is_zero_when_fused_equals_both_sources():
    x = _textured()
    loss_fn = DC2FusionLoss()
    loss = loss_fn(x, x, x)
    assert loss.item() == pytest.approx(0.0, abs=1e-3)
    assert set(loss_fn.last_terms) == {"lncc_mri", "lncc_pet", "ssim_mri", "ssim_pet", "l1_mri", "l1_pet"}
    assert all(v.item() == pytest.approx(0.0, abs=1e-3) for v in loss_fn.last_terms.values())


def test_loss_rises_as_the_fused_image_departs():
    x = _textured()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    loss_fn = DC2FusionLoss()
    values = [loss_fn(x + s * noise, x, x).item() for s in (0.0, 0.02, 0.1, 0.3)]
    assert values == sorted(values)
    assert values[1] > values[0] + 1e-3


def test_each_term_has_its_weight_and_the_sum_matches():
    mri, pet, fused = _textured(0), _textured(1), _textured(2)
    loss_fn = DC2FusionLoss(alpha1=0.5, alpha2=1.5, beta1=2.5, beta2=0.25, gamma1=3.0, gamma2=0.75)
    loss = loss_fn(fused, mri, pet)
    t = loss_fn.last_terms
    expected = (
        0.5 * t["lncc_mri"] + 1.5 * t["lncc_pet"] + 2.5 * t["ssim_mri"]
        + 0.25 * t["ssim_pet"] + 3.0 * t["l1_mri"] + 0.75 * t["l1_pet"]
    )  # fmt: skip
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(t["l1_pet"], (fused - pet).abs().mean())
    # the MRI terms see the MRI: swapping the sources changes which weight each gets
    assert loss_fn(fused, pet, mri).item() != pytest.approx(loss.item(), rel=1e-3)


def test_lncc_sign_convention_only_shifts_the_loss():
    mri, pet, fused = _textured(0), _textured(1), _textured(2)
    offset, raw = DC2FusionLoss(), DC2FusionLoss(lncc_offset=False)
    a, b = offset(fused, mri, pet), raw(fused, mri, pet)
    torch.testing.assert_close(a - b, torch.tensor(3.0))  # alpha1 + alpha2
    assert -1.0 <= raw.last_terms["lncc_mri"].item() <= 0.0  # MONAI's -LNCC^2
    assert 0.0 <= offset.last_terms["lncc_mri"].item() <= 1.0


def test_gradients_reach_the_fused_image():
    mri, pet = _textured(0), _textured(1)
    fused = _textured(2).requires_grad_(True)
    DC2FusionLoss()(fused, mri, pet).backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_invalid_settings_and_inputs_are_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        DC2FusionLoss(beta2=-1.0)
    with pytest.raises(ValueError, match="odd"):
        DC2FusionLoss(ncc_kernel_size=4)
    small = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="SSIM window"):
        DC2FusionLoss()(small, small, small)
    with pytest.raises(ValueError, match="share one shape"):
        DC2FusionLoss()(_textured(), _textured(), _textured(shape=(1, 1, 16, 16, 12)))


@pytest.mark.parametrize(
    "spatial_dims, shape, win",
    [(3, (2, 1, 14, 12, 16), 11), (3, (1, 2, 12, 12, 12), 7), (2, (2, 3, 20, 17), 11)],
)
def test_separable_ssim_equals_monai_ssim_loss(spatial_dims, shape, win):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    y = 0.6 * x + 0.4 * y  # correlated, so SSIM is far from 0
    expected = SSIMLoss(spatial_dims=spatial_dims, data_range=1.0, win_size=win)(x, y)
    got = SeparableSSIMLoss(spatial_dims=spatial_dims, data_range=1.0, win_size=win)(x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    assert SeparableSSIMLoss(spatial_dims, win_size=win)(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_both_ssim_backends_give_the_same_loss_and_gradient():
    mri, pet = _textured(0), _textured(1)
    fused = [_textured(2).requires_grad_(True) for _ in range(2)]
    losses = [DC2FusionLoss(ssim_backend=b)(f, mri, pet) for b, f in zip(("separable", "monai"), fused)]
    # MONAI's dense 11^3 kernel accumulates more float32 rounding (~1e-5 per SSIM term on these smooth volumes)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-4)
    exact = SeparableSSIMLoss()(fused[0].detach().double(), mri.double())
    assert abs(DC2FusionLoss().terms(fused[0], mri, pet)["ssim_mri"].item() - exact.item()) < 2e-6
    for loss in losses:
        loss.backward()
    scale = fused[1].grad.abs().max().item()
    torch.testing.assert_close(fused[0].grad, fused[1].grad, rtol=1e-3, atol=1e-3 * scale)
    with pytest.raises(ValueError, match="ssim_backend"):
        DC2FusionLoss(ssim_backend="fast")


def test_stacked_sources_form_equals_the_three_argument_form():
    """The form MONAI's SupervisedTrainer uses: loss(pred, label) with label = cat(MRI, PET)."""
    mri, pet, fused = _textured(0), _textured(1), _textured(2)
    loss_fn = DC2FusionLoss()
    torch.testing.assert_close(loss_fn(fused, torch.cat((mri, pet), dim=1)), loss_fn(fused, mri, pet))
    with pytest.raises(ValueError, match="stack MRI and PET"):
        loss_fn(fused, torch.cat((mri, pet, pet), dim=1))
