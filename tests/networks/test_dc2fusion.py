"""Tests of common/networks/dc2fusion.py and common/networks/blocks/deformable_cross_attention.py."""

from __future__ import annotations

import pytest
import torch

from common.losses.fusion import DC2FusionLoss
from common.networks.blocks.deformable_cross_attention import (
    DeformableCrossFeatureBlendBlock,
    OffsetNetwork,
    deformable_sample,
)
from common.networks.blocks.window_attention import LocalWindowCrossAttention
from common.networks.dc2fusion import DC2Fusion

SMALL = {"embed_dim": 12, "depths": (1, 1), "num_heads": (1, 2), "window_size": 2}


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors run faster on one thread, and far faster when other jobs share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- deformable sampling


def test_zero_offsets_reproduce_the_other_stream():
    y = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    out = deformable_sample(y, torch.zeros(2, 3, 5, 6, 7, dtype=torch.float64))
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_unit_offset_shifts_along_its_own_axis_on_a_non_cubic_volume(axis):
    y = torch.randn(1, 2, 4, 6, 9, dtype=torch.float64)
    offsets = torch.zeros(1, 3, 4, 6, 9, dtype=torch.float64)
    offsets[:, axis] = 1.0  # +1 voxel along D, H or W
    out = deformable_sample(y, offsets, padding_mode="border")
    dim = 2 + axis
    n = y.shape[dim]
    # out[i] = y[i + 1] inside; the last voxel reads past the edge and "border" repeats y[n - 1]
    torch.testing.assert_close(out.narrow(dim, 0, n - 1), y.narrow(dim, 1, n - 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.narrow(dim, n - 1, 1), y.narrow(dim, n - 1, 1), rtol=0, atol=1e-12)


def test_half_voxel_offset_interpolates_linearly_along_width():
    y = torch.randn(1, 1, 3, 4, 5, dtype=torch.float64)
    offsets = torch.zeros(1, 3, 3, 4, 5, dtype=torch.float64)
    offsets[:, 2] = 0.5
    out = deformable_sample(y, offsets)
    torch.testing.assert_close(out[..., :-1], 0.5 * (y[..., :-1] + y[..., 1:]), rtol=0, atol=1e-12)


def test_deformable_sample_rejects_mismatched_offsets():
    with pytest.raises(ValueError, match="offsets"):
        deformable_sample(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_offsets_start_at_zero_and_stay_within_range():
    net = OffsetNetwork(channels=4, offset_range=1.5)
    x, y = torch.randn(2, 4, 3, 5, 6), torch.randn(2, 4, 3, 5, 6)
    assert torch.count_nonzero(net(x, y)) == 0  # identity sampling at initialisation
    torch.nn.init.normal_(net.to_offsets.weight, std=50.0)
    offsets = net(x, y)
    assert offsets.shape == (2, 3, 3, 5, 6)
    assert offsets.abs().max() <= 1.5
    assert offsets.abs().max() > 1.0  # the bound is reached, not a smaller one


# ---------------------------------------------------------------- window cross-attention of the DCFB block
# (the attention itself, LocalWindowCrossAttention, is tested in test_window_attention.py)


def test_attention_rows_sum_to_one_and_padded_keys_get_no_weight():
    block = DeformableCrossFeatureBlendBlock(dim=6, num_heads=3, window_size=2, conv_norm="instance")
    x, y = torch.randn(2, 6, 3, 5, 4), torch.randn(2, 6, 3, 5, 4)  # D and H are not window multiples
    out, maps = block.forward_with_maps(x, y)
    assert out.shape == x.shape
    weights = maps["attention"]
    n_windows = 2 * 3 * 2  # per sample, on the padded 4 x 6 x 4 grid
    assert weights.shape == (2 * n_windows, 3, 8, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2 * n_windows, 3, 8))
    # the last window along D holds real voxels at depth 2 only: its real queries (tokens 0..3) give the keys
    # at padded depth 3 (tokens 4..7) no weight
    last_d_window = (1 * 3 + 0) * 2 + 0  # window (d=1, h=0, w=0) of sample 0
    assert torch.all(weights[last_d_window, :, :4, 4:] == 0)


def test_attention_is_the_shared_window_cross_attention_with_a_value_gate():
    block = DeformableCrossFeatureBlendBlock(dim=4, num_heads=2, window_size=(2, 1, 2), use_rel_pos_bias=False)
    assert isinstance(block.attention, LocalWindowCrossAttention)
    assert block.attention.window_size == [2, 1, 2] and block.attention.position_bias is None
    # zero channel gates remove the values: the attention branch is then the projection bias alone
    torch.nn.init.constant_(block.channel_interaction.gate[3].bias, -1e4)
    x, y = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)
    captured = {}
    handle = block.attention.register_forward_hook(lambda m, args, out: captured.update(out=out))
    block.eval()(x, y)
    handle.remove()
    torch.testing.assert_close(
        captured["out"], block.attention.proj.bias.view(1, 1, 4, 1, 1, 1).expand(1, 1, 4, 2, 2, 2)
    )
    with pytest.raises(ValueError, match="num_heads"):
        DeformableCrossFeatureBlendBlock(dim=6, num_heads=4)


# ---------------------------------------------------------------- DCFB block


def test_block_keeps_constant_fields_constant():
    """A channel-first -> channel-last reshape (instead of a permute) would mix voxels and break this."""
    torch.manual_seed(0)
    block = DeformableCrossFeatureBlendBlock(dim=6, num_heads=2, conv_kernel_size=1, conv_norm="instance").eval()
    x = torch.randn(1, 6, 1, 1, 1).expand(1, 6, 4, 6, 4).contiguous()
    y = torch.randn(1, 6, 1, 1, 1).expand(1, 6, 4, 6, 4).contiguous()
    out = block(x, y)
    torch.testing.assert_close(out, out[:, :, :1, :1, :1].expand_as(out))
    assert not torch.allclose(out, x)


def test_block_has_separate_norms_and_returns_maps():
    block = DeformableCrossFeatureBlendBlock(dim=4, num_heads=1, window_size=2, offset_range=0.5)
    assert block.norm_mlp is not block.norm_query
    x, y = torch.randn(2, 4, 4, 2, 6), torch.randn(2, 4, 4, 2, 6)
    out, maps = block.forward_with_maps(x, y)
    torch.testing.assert_close(block(x, y), out)
    assert out.shape == x.shape
    assert maps["offsets"].shape == (2, 3, 4, 2, 6)
    assert maps["attention"].shape == (2 * 2 * 1 * 3, 1, 8, 8)


# ---------------------------------------------------------------- fusion head and network


def test_network_handles_non_cubic_inputs_and_exposes_maps():
    torch.manual_seed(0)
    net = DC2Fusion(**SMALL)
    mri, pet = torch.rand(1, 1, 16, 24, 32), torch.rand(1, 1, 16, 24, 32)
    fused, maps = net.forward_with_maps(mri, pet)
    assert fused.shape == (1, 1, 16, 24, 32)
    assert [(m["stage"], m["query"]) for m in maps["blocks"]] == [(0, "mri"), (0, "pet"), (1, "mri"), (1, "pet")]
    assert maps["blocks"][0]["offsets"].shape == (1, 3, 4, 6, 8)
    assert maps["blocks"][2]["offsets"].shape == (1, 3, 2, 3, 4)
    for m in maps["blocks"]:
        torch.testing.assert_close(m["attention"].sum(-1), torch.ones(m["attention"].shape[:-1]))
    assert maps["fusion_weights"].shape == (1, 2, 16, 24, 32)
    torch.testing.assert_close(net(torch.cat((mri, pet), dim=1)), fused)  # the stacked-channel form


def test_network_compiles_with_torchscript_and_matches_eager():
    torch.manual_seed(0)
    net = DC2Fusion(**SMALL).eval()
    scripted = torch.jit.script(net)
    stacked = torch.rand(1, 2, 16, 8, 24)
    with torch.no_grad():
        torch.testing.assert_close(scripted(stacked), net(stacked))
        torch.testing.assert_close(scripted(stacked[:, :1], stacked[:, 1:]), net(stacked))


@pytest.mark.parametrize("shape", [(1, 1, 20, 16, 16), (1, 1, 16, 16, 12)])
def test_sizes_not_divisible_by_patch_and_merging_are_rejected(shape):
    net = DC2Fusion(**SMALL)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(shape), torch.rand(shape))


def test_mismatched_inputs_and_bad_configurations_are_rejected():
    net = DC2Fusion(**SMALL)
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 24))
    with pytest.raises(ValueError, match="num_heads"):
        DC2Fusion(embed_dim=12, depths=(1, 1), num_heads=(5, 2))
    with pytest.raises(ValueError, match="one entry per stage"):
        DC2Fusion(embed_dim=12, depths=(1, 1, 1), num_heads=(1, 2))


def test_default_configuration_is_the_paper_one():
    net = DC2Fusion()
    assert net.size_divisor == 32
    assert [len(stage.blocks) for stage in net.stages] == [2, 2, 6, 2]
    assert [stage.blocks[0].attention.num_heads for stage in net.stages] == [3, 6, 12, 24]
    assert [stage.blocks[0].dim for stage in net.stages] == [96, 192, 384, 768]
    assert net.stages[0].embed.proj.kernel_size == (4, 4, 4) and net.stages[1].embed.proj.stride == (2, 2, 2)


def test_ten_steps_of_training_reduce_the_loss():
    torch.manual_seed(3407)
    grid = torch.linspace(-1, 1, 32)
    z, y, x = torch.meshgrid(grid, grid, grid, indexing="ij")
    head = (x**2 + y**2 + z**2 < 0.7).float()
    mri = (head * (0.5 + 0.3 * torch.sin(8 * x) * torch.cos(6 * y))).clamp(0, 1)[None, None]
    pet = (head * torch.exp(-((x - 0.2) ** 2 + y**2 + z**2) / 0.1))[None, None]
    net = DC2Fusion(**SMALL)
    loss_fn = DC2FusionLoss(ncc_kernel_size=5, ssim_win=7)
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = loss_fn(net(mri, pet), mri, pet)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_fused_attention_gives_the_explicit_output():
    torch.manual_seed(0)
    fused = DC2Fusion(**SMALL).eval()
    explicit = DC2Fusion(**SMALL, fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.rand(1, 2, 16, 24, 8)  # the 1-voxel-deep second stage clamps the window
    with torch.no_grad():
        torch.testing.assert_close(fused(x), explicit(x), atol=1e-5, rtol=1e-5)


def _saved_for_backward(net, *inputs):
    """``(net(*inputs), bytes autograd stores for backward outside checkpointed regions)``."""
    stored = 0

    def pack(t):
        nonlocal stored
        stored += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return net(*inputs), stored


def test_gradient_checkpointing_keeps_outputs_gradients_and_batch_norm_statistics():
    torch.manual_seed(0)
    plain = DC2Fusion(**SMALL)  # batch norm in the convolution branch
    checkpointed = DC2Fusion(**SMALL, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    mri, pet = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    outs, saved = [], []
    for net in (plain, checkpointed):
        out, stored = _saved_for_backward(net.train(), mri, pet)
        out.square().mean().backward()
        outs.append(out)
        saved.append(stored)
    torch.testing.assert_close(outs[1], outs[0])
    assert saved[1] < 0.9 * saved[0], f"checkpointing stored {saved[1]} of {saved[0]} bytes"
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")
    # the recomputation in backward must not update the running statistics a second time
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=f"buffer {name}")
    assert any("running_mean" in name for name, _ in plain.named_buffers())
