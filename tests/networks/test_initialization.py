"""Tests of common/networks/initialization.py: the output-prior bias reaches the output of every brain network."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import SegResNet, SwinUNETR

from common.networks.hlwa_unet import HLWAUNet
from common.networks.initialization import init_output_prior


@pytest.mark.parametrize(
    "make",
    [
        lambda: HLWAUNet(features=(4, 8, 8, 16, 16), num_heads=2, return_region_features=False),
        lambda: SegResNet(
            spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,)
        ),
        lambda: SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1)),
    ],
    ids=["hlwa", "segresnet", "swinunetr"],
)
def test_prior_shifts_every_output_logit_by_the_prior_logit(make):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(1, 4, 64, 64, 64)  # SwinUNETR's deepest map must hold more than one voxel
    with torch.no_grad():
        init_output_prior(net, 0.5)  # bias 0: the reference
        zero = net(x)
        assert init_output_prior(net, 0.01) is net
        shifted = net(x)
    # the initialised convolution is the output layer itself: every voxel and channel moves by logit(0.01)
    assert torch.allclose(shifted - zero, torch.full_like(zero, math.log(0.01 / 0.99)), atol=1e-4)
    assert torch.sigmoid(shifted).mean() < 0.1 < 0.3 < torch.sigmoid(zero).mean()


def test_none_keeps_the_network_and_bad_priors_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1))
    before = net[0].bias.detach().clone()
    assert init_output_prior(net, None) is net and torch.equal(net[0].bias, before)
    for prior in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="prior must be a probability"):
            init_output_prior(net, prior)
    with pytest.raises(ValueError, match="no output convolution with a bias"):
        init_output_prior(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1, bias=False)), 0.01)
