"""Tests for common/losses/contrastive.py against values computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.losses.contrastive import (
    EnhancedSupConLoss,
    SegmentationLoss,
    SensitivityBCELoss,
    SupConLoss,
    enhanced_contrastive_loss,
    sensitivity_bce_loss,
    supervised_contrastive_loss,
)

# two tight clusters: class 0 along x, class 1 along y
Z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # norms differ: z is normalised inside
Y = torch.tensor([0, 0, 1, 1])


def test_supervised_contrastive_hand_values():
    # every anchor: P = e^(1/T) (its twin), N = 2 e^0 (the other cluster) -> log(1 + 2 e^(-1/T))
    assert supervised_contrastive_loss(Z, Y, temperature=1.0).item() == pytest.approx(0.5514447, abs=1e-6)
    assert supervised_contrastive_loss(Z, Y, temperature=0.5).item() == pytest.approx(0.2395448, abs=1e-6)
    # anchor 2 has no positive and is left out: anchor 0 log(1 + e) = 1.3132617, anchor 1 log 2 = 0.6931472
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    assert supervised_contrastive_loss(z, y, temperature=1.0).item() == pytest.approx(1.0032044, abs=1e-6)
    assert SupConLoss(temperature=1.0)(Z, Y).item() == pytest.approx(0.5514447, abs=1e-6)


def test_enhanced_contrastive_hand_values():
    # high anchors (label 1): log(1 + 2 / (1.5 e)) = 0.3991156; low anchors: log(1 + 2 / e) = 0.5514447
    assert enhanced_contrastive_loss(Z, Y, 1.0, 1.5).item() == pytest.approx(0.4752802, abs=1e-6)
    assert EnhancedSupConLoss(1.0, 1.5)(Z, Y).item() == pytest.approx(0.4752802, abs=1e-6)
    # weight 1 is the plain loss; positive_class selects which anchors are weighted
    torch.testing.assert_close(enhanced_contrastive_loss(Z, Y, 1.0, 1.0), supervised_contrastive_loss(Z, Y, 1.0))
    flipped = enhanced_contrastive_loss(Z, Y, 1.0, 1.5, positive_class=0)
    assert flipped.item() == pytest.approx(0.4752802, abs=1e-6)  # symmetric example
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert enhanced_contrastive_loss(z, y, 1.0, 1.5) < supervised_contrastive_loss(z, y, 1.0)


def test_contrastive_rises_when_a_negative_pair_gets_closer():
    base = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]])
    closer = base.clone()
    closer[2] = torch.tensor([0.7, 1.0])  # class-1 sample moved towards class 0
    for loss in (supervised_contrastive_loss, enhanced_contrastive_loss):
        assert loss(closer, Y) > loss(base, Y)


def test_contrastive_rejects_single_class_and_bad_shapes():
    with pytest.raises(ValueError, match="single class"):
        supervised_contrastive_loss(Z, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="single class"):
        EnhancedSupConLoss()(Z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supervised_contrastive_loss(Z[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one entry per embedding"):
        supervised_contrastive_loss(Z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)


def test_contrastive_gradients_are_finite_with_anchors_left_out():
    z = torch.randn(5, 8, requires_grad=True)
    supervised_contrastive_loss(z, torch.tensor([0, 0, 1, 1, 2])).backward()  # label 2: no positive
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_sensitivity_bce_hand_values():
    logits = torch.zeros(2)
    target = torch.tensor([1.0, 0.0])
    # BCE = log 2 for both; weights 1 + 2 * 0.5 * 1 = 2 and 1 -> mean 1.5 log 2
    assert sensitivity_bce_loss(logits, target).item() == pytest.approx(1.0397208, abs=1e-6)
    assert SensitivityBCELoss(beta=0.0)(logits, target).item() == pytest.approx(0.6931472, abs=1e-6)
    per_pixel = sensitivity_bce_loss(logits, target, reduction="none")
    torch.testing.assert_close(per_pixel, torch.tensor([1.3862944, 0.6931472]))


def test_missed_lesion_pixel_costs_more_than_with_plain_bce():
    target = torch.tensor([1.0])
    found, missed = torch.tensor([2.0]), torch.tensor([-2.0])
    bce_rise = F.binary_cross_entropy_with_logits(missed, target) - F.binary_cross_entropy_with_logits(found, target)
    sens_rise = sensitivity_bce_loss(missed, target) - sensitivity_bce_loss(found, target)
    assert bce_rise.item() == pytest.approx(2.0, abs=1e-5)  # softplus(2) - softplus(-2)
    assert sens_rise.item() == pytest.approx(5.7165236, abs=1e-5)
    # and a missed lesion pixel costs more than a false positive of the same confidence
    assert sensitivity_bce_loss(missed, target) > sensitivity_bce_loss(torch.tensor([2.0]), torch.tensor([0.0]))


def test_segmentation_loss_hand_value_and_validation():
    logits = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    # MSE(0.5, [1, 0]) = 0.25, plus 1.5 log 2
    assert SegmentationLoss()(logits, target).item() == pytest.approx(1.2897208, abs=1e-6)
    assert SegmentationLoss(bce_weight=0.0)(logits, target).item() == pytest.approx(0.25, abs=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        SegmentationLoss()(logits, target[..., :1])
    with pytest.raises(ValueError, match="reduction"):
        SensitivityBCELoss(reduction="max")
