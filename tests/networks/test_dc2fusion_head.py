"""Tests of the DC2Fusion fusion head (common/networks/dc2fusion.py): the paper's L1-norm weighted rule is the
default, and the normalised weights, the 1x1x1 projection and the output activations are options."""

from __future__ import annotations

import pytest
import torch

from common.networks.dc2fusion import DC2Fusion, l1_weighted_fusion

SMALL = {"embed_dim": 12, "depths": (1, 1), "num_heads": (1, 2), "window_size": 2}


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _head_features(net: DC2Fusion, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's output and the ``f1``, ``f2`` its head fused (read from the full-resolution ConvTranspose3d)."""
    seen = []
    hook = net.head_up.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        out = net(x)
    hook.remove()
    f1, f2 = seen[0].chunk(2, dim=1)
    return out, f1, f2


def test_paper_rule_weights_each_map_by_its_l1_norm_over_channels():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    fused, weights = l1_weighted_fusion(f1, f2)
    n1, n2 = f1.abs().sum(1, keepdim=True), f2.abs().sum(1, keepdim=True)
    torch.testing.assert_close(fused, n1 * f1 + n2 * f2)
    torch.testing.assert_close(weights, torch.cat((n1, n2), dim=1))
    # equal maps are weighted equally (each by its norm), so F = 2 ||f||_1 f
    fused, weights = l1_weighted_fusion(f1, f1.clone())
    assert torch.equal(weights[:, :1], weights[:, 1:])
    torch.testing.assert_close(fused, 2 * n1 * f1)


def test_default_network_output_is_the_papers_fusion_of_f1_and_f2():
    torch.manual_seed(0)
    net = DC2Fusion(**SMALL).eval()
    assert isinstance(net.head_out, torch.nn.Identity)
    assert not any(name.startswith("head_out") for name, _ in net.named_parameters())
    out, f1, f2 = _head_features(net, torch.rand(1, 2, 16, 16, 16))
    assert f1.shape == (1, 1, 16, 16, 16)  # one channel each: head_channels = out_channels
    torch.testing.assert_close(out, f1.abs() * f1 + f2.abs() * f2)
    assert out.min() < 0  # no output activation


def test_normalized_weights_sum_to_one_and_equal_maps_return_the_map():
    f = torch.randn(2, 3, 4, 5, 6)
    fused, weights = l1_weighted_fusion(f, f.clone(), normalize=True)
    assert torch.equal(fused, f) and torch.equal(weights, torch.full((2, 2, 4, 5, 6), 0.5))
    f1, f2 = torch.full((1, 2, 2, 2, 2), 3.0), torch.full((1, 2, 2, 2, 2), -1.0)
    fused, weights = l1_weighted_fusion(f1, f2, eps=1e-12, normalize=True)
    torch.testing.assert_close(weights[:, 0], torch.full((1, 2, 2, 2), 0.75))
    torch.testing.assert_close(fused, torch.full_like(f1, 0.75 * 3.0 - 0.25 * 1.0))
    net = DC2Fusion(**SMALL, normalize_fusion_weights=True).eval()
    out, f1, f2 = _head_features(net, torch.rand(1, 2, 16, 16, 16))
    n1, n2 = f1.abs() + 1e-6, f2.abs() + 1e-6
    torch.testing.assert_close(out, (n1 * f1 + n2 * f2) / (n1 + n2))


def test_projection_is_an_option_and_wider_maps_need_it():
    torch.manual_seed(0)
    net = DC2Fusion(**SMALL, head_channels=4, fusion_projection=True).eval()
    assert isinstance(net.head_out, torch.nn.Conv3d) and net.head_out.in_channels == 4
    out, f1, f2 = _head_features(net, torch.rand(1, 2, 16, 16, 16))
    assert f1.shape[1] == 4 and out.shape == (1, 1, 16, 16, 16)
    torch.testing.assert_close(out, net.head_out(l1_weighted_fusion(f1, f2)[0]))
    with pytest.raises(ValueError, match="fusion_projection"):
        DC2Fusion(**SMALL, head_channels=4)


@pytest.mark.parametrize("activation", ["abs", "sigmoid"])
def test_output_activation_is_applied_and_scripts(activation):
    torch.manual_seed(0)
    x = torch.rand(1, 2, 16, 16, 16)
    plain = DC2Fusion(**SMALL).eval()
    net = DC2Fusion(**SMALL, output_activation=activation).eval()
    net.load_state_dict(plain.state_dict())  # no parameters of its own
    with torch.no_grad():
        raw = plain(x)
        assert raw.min() < 0  # the paper's output is unbounded
        expected = raw.abs() if activation == "abs" else torch.sigmoid(raw)
        torch.testing.assert_close(net(x), expected)
        torch.testing.assert_close(torch.jit.script(net)(x), expected)
    with pytest.raises(ValueError, match="output_activation"):
        DC2Fusion(**SMALL, output_activation="relu")


def test_every_head_option_scripts_and_matches_eager():
    torch.manual_seed(0)
    net = DC2Fusion(**SMALL, head_channels=3, fusion_projection=True, normalize_fusion_weights=True).eval()
    x = torch.rand(1, 2, 16, 8, 24)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))
