"""Tests of common/networks/hlwa_unet.py (HLWA-UNet)."""

from __future__ import annotations

import pytest
import torch

from common.losses.region_contrastive import HLWALoss
from common.networks.hlwa_unet import HLWAUNet, ModalityFusion

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")

TINY = {"features": (4, 8, 8, 16, 16), "num_heads": 2}
# 4 downsamplings: the bottleneck of a (32, 16, 16) input is (2, 1, 1), more than the one voxel
# instance normalisation needs in training
SIZE = (32, 16, 16)
BOTTLENECK = (2, 1, 1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Deterministic weights; one thread, as OpenMP threads only add overhead (and spin when the CPU is busy)
    for tensors this small."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_net() -> HLWAUNet:
    """One tiny network shared by the tests that only run it (building and first runs dominate the cost)."""
    torch.manual_seed(0)
    return HLWAUNet(**TINY)


def _target(shape: tuple[int, ...]) -> torch.Tensor:
    """A TC/WT/ET-like region map: ET inside TC inside WT."""
    wt = (torch.rand(shape) > 0.6).float()
    tc = wt * (torch.rand(shape) > 0.5).float()
    et = tc * (torch.rand(shape) > 0.5).float()
    return torch.cat([tc, wt, et], dim=1)


def test_eval_returns_tensor_and_train_returns_region_features(tiny_net):
    net = tiny_net
    x = torch.randn(2, 4, *SIZE)
    with torch.no_grad():
        out = net.train()(x)
    assert isinstance(out, tuple) and len(out) == 4
    seg, f_a, f_b, f_c = out
    assert seg.shape == (2, 3, *SIZE)
    for f in (f_a, f_b, f_c):
        assert f.shape == (2, 16, *BOTTLENECK)  # region_channels defaults to features[-1]
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, *SIZE)
    net.return_region_features = False
    try:
        with torch.no_grad():
            assert isinstance(net.train()(x), torch.Tensor)
    finally:
        net.return_region_features = True


def test_non_cubic_input_with_shifted_windows_and_sum_fusion():
    net = HLWAUNet(
        features=(4, 8, 16),
        num_heads=2,
        attention_stages=(1, 2),
        shift_windows=True,
        fusion="sum",
        region_channels=8,
        out_channels=2,
    ).eval()
    x = torch.randn(1, 4, 8, 12, 20)  # 2 downsamplings: divisible by 4; windows padded and clamped
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 2, 8, 12, 20) and torch.isfinite(y).all()
    net = HLWAUNet(**TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 4, 32, 16, 48)).shape == (1, 3, 32, 16, 48)


@pytest.mark.parametrize("size", [(16, 16, 24), (20, 16, 16), (16, 8, 16)])
def test_input_size_not_divisible_is_a_clear_error(tiny_net, size):
    with pytest.raises(ValueError, match=rf"size {[s for s in size if s % 16][0]} .*not divisible by 16"):
        tiny_net(torch.randn(1, 4, *size))


def test_wrong_number_of_channels_is_a_clear_error(tiny_net):
    with pytest.raises(ValueError, match="T1c, T1, T2, FLAIR"):
        tiny_net(torch.randn(1, 3, 16, 16, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 2}, "only spatial_dims=3"),
        ({"in_channels": 3}, "in_channels=4"),
        ({"fusion": "max"}, "fusion"),
        ({"attention_stages": (5,)}, "attention_stages"),
        ({"attention_stages": (3, 3)}, "attention_stages"),
        ({"num_heads": 3}, "not divisible by num_heads"),
        ({"region_channels": 5}, "region_channels=5"),
        ({"shift_windows": True, "attention_depth": 1}, "attention_depth >= 2"),
        ({"dropout": 1.0}, "dropout"),
        ({"features": (8,)}, "at least 2"),
        ({"window_size": (4, 4)}, "window_size"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HLWAUNet(**{**TINY, **kwargs})


def test_torchscript_matches_eager():
    net = HLWAUNet(**TINY, shift_windows=True).eval()
    x = torch.randn(2, 4, *SIZE)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=1e-5)


def test_every_encoder_receives_gradient_from_the_training_loss(tiny_net):
    net = tiny_net.train()
    net.zero_grad(set_to_none=True)
    x = torch.randn(1, 4, *SIZE)
    loss = HLWALoss()(net(x), _target((1, 1, *SIZE)))
    loss.backward()
    assert len(net.encoders) == 4
    for m, encoder in enumerate(net.encoders):
        grads = [p.grad for p in encoder.parameters()]
        assert all(g is not None for g in grads), f"encoder {m} has parameters without gradient"
        assert sum(g.abs().sum() for g in grads) > 0, f"encoder {m} receives no gradient"
    # the modality encoders do not share weights
    pointers = {encoder.stages[0][0].conv.weight.data_ptr() for encoder in net.encoders}
    assert len(pointers) == 4


def test_each_modality_reaches_the_segmentation_and_the_region_features(tiny_net):
    # sample 0 is the base case, sample m + 1 replaces channel m: samples are independent (instance norm),
    # so one batched forward compares all five
    x = torch.randn(1, 4, *SIZE).repeat(5, 1, 1, 1, 1)
    for m in range(4):
        x[m + 1, m] = torch.randn(SIZE)
    with torch.no_grad():
        seg, f_a, f_b, f_c = tiny_net.train()(x)
    for m in range(4):
        assert not torch.allclose(seg[m + 1], seg[0]), f"the segmentation ignores channel {m}"
        assert not torch.allclose(f_a[m + 1], f_a[0]), f"f_a ignores channel {m}"  # from f_f = M(f1..f4)
    # three separate DRL branches
    assert not torch.allclose(f_a, f_b) and not torch.allclose(f_b, f_c)


def test_optimisation_steps_reduce_the_loss():
    # a 2-downsampling variant keeps this fast; the code path is the same as with 4
    net = HLWAUNet(features=(4, 8, 8), num_heads=2, attention_stages=(1, 2)).train()
    loss_fn = HLWALoss()
    x = torch.randn(2, 4, 8, 8, 8)
    y = _target((2, 1, 8, 8, 8))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert loss_fn(net(x), y).item() < losses[0]


def test_modality_fusion_modes():
    maps = [torch.randn(1, 3, 2, 2, 2) for _ in range(4)]
    total = maps[0] + maps[1] + maps[2] + maps[3]
    torch.testing.assert_close(ModalityFusion(4, 3, 3, "sum")(maps), total)
    concat = ModalityFusion(4, 3, 5, "concat")
    expected = torch.nn.functional.conv3d(torch.cat(maps, 1), concat.proj.weight, concat.proj.bias)
    torch.testing.assert_close(concat(maps), expected)
    with pytest.raises(ValueError, match="expected 4 maps"):
        concat(maps[:3])


def test_fused_attention_gives_the_explicit_output():
    fused = HLWAUNet(**TINY, shift_windows=True).eval()
    explicit = HLWAUNet(**TINY, shift_windows=True, fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(1, 4, *SIZE)  # shifted windows on maps smaller than the window: masks and clamping
    with torch.no_grad():
        torch.testing.assert_close(fused(x), explicit(x), atol=1e-5, rtol=1e-5)


def _saved_for_backward(net, x):
    """``(net(x), bytes autograd stores for backward outside checkpointed regions)``."""
    stored = 0

    def pack(t):
        nonlocal stored
        stored += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return net(x), stored


def test_gradient_checkpointing_of_the_encoders_keeps_outputs_and_gradients():
    plain = HLWAUNet(**TINY, dropout=0.1)  # dropout: the recomputation must replay the same masks
    checkpointed = HLWAUNet(**TINY, dropout=0.1, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(1, 4, *SIZE), _target((1, 1, *SIZE))
    results = []
    for net in (plain, checkpointed):
        torch.manual_seed(1)
        out, stored = _saved_for_backward(net.train(), x)
        HLWALoss()(out, y).backward()
        results.append((out, stored))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")
    assert results[1][1] < 0.8 * results[0][1], "checkpointing stores the encoders' activations"
    # evaluation and TorchScript ignore the option
    checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(checkpointed)(x), plain.eval()(x), atol=1e-5, rtol=1e-5)
