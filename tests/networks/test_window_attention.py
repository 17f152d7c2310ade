"""Tests of common/networks/blocks/window_attention.py (LWSA / LWCA of HLWA-UNet)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from common.networks.blocks.window_attention import (
    LocalWindowCrossAttention,
    LocalWindowSelfAttention,
    LocalWindowTransformerBlock,
    RelativePositionBias,
    effective_window,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Deterministic weights; one thread, as OpenMP threads only add overhead (and spin when the CPU is busy)
    for tensors this small."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_lwsa(module: LocalWindowSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """LWSA written token by token from coordinates (no roll, no partition): each real voxel attends to the
    real voxels of its (shifted) window that came from the same pre-shift region."""
    _, c, *size = x.shape
    window, shift = effective_window(size, module.window_size, module.shift_size)
    padded = [math.ceil(s / w) * w for s, w in zip(size, window)]
    heads, hd = module.num_heads, c // module.num_heads
    tokens = x[0].permute(1, 2, 3, 0).reshape(-1, c)
    q, k, v = module.qkv(tokens).reshape(-1, 3, heads, hd).unbind(1)
    positions = list(itertools.product(*[range(s) for s in size]))

    def place(p):
        rolled = [(p[i] - shift[i]) % padded[i] for i in range(3)]
        win = tuple(r // w for r, w in zip(rolled, window))
        inner = tuple(r % w for r, w in zip(rolled, window))
        region = tuple(
            0 if r < padded[i] - window[i] else (1 if r < padded[i] - shift[i] else 2) for i, r in enumerate(rolled)
        )
        return win, inner, region

    places = [place(p) for p in positions]
    table_w = module.window_size
    out = torch.zeros(len(positions), c)
    for i, (win_i, inner_i, reg_i) in enumerate(places):
        keys = [j for j, (win_j, _, reg_j) in enumerate(places) if win_j == win_i and reg_j == reg_i]
        logits = torch.einsum("hd,khd->hk", q[i], k[keys]) * hd**-0.5
        if module.position_bias is not None:
            idx = [
                (inner_i[0] - places[j][1][0] + table_w[0] - 1) * (2 * table_w[1] - 1) * (2 * table_w[2] - 1)
                + (inner_i[1] - places[j][1][1] + table_w[1] - 1) * (2 * table_w[2] - 1)
                + (inner_i[2] - places[j][1][2] + table_w[2] - 1)
                for j in keys
            ]
            logits = logits + module.position_bias.table[idx].T
        out[i] = torch.einsum("hk,khd->hd", logits.softmax(-1), v[keys]).reshape(c)
    return module.proj(out).reshape(*size, c).permute(3, 0, 1, 2).unsqueeze(0)


def test_partition_reverse_round_trip_and_window_content():
    x = torch.randn(2, 4, 6, 8, 3)
    windows = window_partition(x, [2, 3, 4])
    assert windows.shape == (2 * 2 * 2 * 2, 24, 3)
    # window 0 of batch 0 is the corner block, tokens in row-major (d, h, w) order
    assert torch.equal(windows[0], x[0, :2, :3, :4].reshape(24, 3))
    # window 1 is the next block along W
    assert torch.equal(windows[1], x[0, :2, :3, 4:8].reshape(24, 3))
    assert torch.equal(window_reverse(windows, [2, 3, 4], [4, 6, 8]), x)


def test_effective_window_clamps_and_drops_shift():
    assert effective_window([2, 8, 3], [4, 4, 4], [2, 2, 2]) == ([2, 4, 3], [0, 2, 0])
    assert effective_window([5, 4, 9], [4, 4, 4], [2, 2, 2]) == ([4, 4, 4], [2, 0, 2])


def test_shifted_window_mask_separates_pre_shift_regions():
    # D = 8, window 4, shift 2: the second rolled window holds original voxels 6, 7 and (wrapped) 0, 1
    mask = shifted_window_mask([8, 1, 1], [4, 1, 1], [2, 0, 0], [8, 1, 1], torch.device("cpu"))
    assert mask.shape == (2, 4, 4)
    assert not mask[0].any()
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask[1], expected)


def test_mask_blocks_padding_keys_but_keeps_rows_non_empty():
    # D = 3 padded to 4: the last token of the window is padding
    mask = shifted_window_mask([4, 1, 1], [4, 1, 1], [0, 0, 0], [3, 1, 1], torch.device("cpu"))
    assert mask[0, :3, 3].all() and not mask[0, :3, :3].any()
    assert (~mask).any(-1).all()


def test_relative_position_index_depends_only_on_offset():
    idx = relative_position_index([2, 3, 2], [2, 3, 2], torch.device("cpu"))
    coords = torch.tensor(list(itertools.product(range(2), range(3), range(2))))
    offsets = coords[:, None] - coords[None]
    for (i, j), (k, m) in itertools.combinations(itertools.product(range(12), repeat=2), 2):
        same_offset = torch.equal(offsets[i, j], offsets[k, m])
        assert (idx[i, j] == idx[k, m]).item() == same_offset
    assert idx.unique().numel() == 3 * 5 * 3
    # a clamped window reuses the full table: offset (0, 0, 0) is the same entry
    small = relative_position_index([1, 2, 2], [2, 3, 2], torch.device("cpu"))
    assert small[0, 0] == idx[0, 0]


def test_relative_position_bias_shape_and_clamped_window():
    rpb = RelativePositionBias(4, num_heads=3)
    assert rpb(rpb.window_size).shape == (3, 64, 64)
    full = rpb([4, 4, 4])
    small = rpb([2, 4, 4])
    # tokens (0,0,0) and (1,0,0) have the same offset in both windows
    assert torch.equal(small[:, 0, 16], full[:, 0, 16])


@pytest.mark.parametrize(
    "size, window, shift, rpb",
    [
        ((8, 8, 8), 4, 0, True),
        ((6, 5, 7), 4, 0, True),
        ((6, 5, 7), 4, 2, True),
        ((2, 9, 6), (4, 4, 2), (2, 2, 1), False),
    ],
)
def test_lwsa_matches_token_by_token_reference(size, window, shift, rpb):
    module = LocalWindowSelfAttention(4, 2, window_size=window, shift_size=shift, relative_position_bias=rpb).eval()
    x = torch.randn(1, 4, *size)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _reference_lwsa(module, x), atol=1e-5, rtol=1e-5)


def test_lwsa_output_in_a_window_ignores_input_outside_it():
    module = LocalWindowSelfAttention(4, 2, window_size=4).eval()
    x = torch.randn(1, 4, 8, 8, 8)
    y = x.clone()
    y[:, :, 4:, :, :] += torch.randn_like(y[:, :, 4:, :, :])  # every window except those with d < 4
    y[:, :, :4, 4:, :] += 1.0  # and the windows with h >= 4
    with torch.no_grad():
        out_x, out_y = module(x), module(y)
    torch.testing.assert_close(out_x[:, :, :4, :4, :], out_y[:, :, :4, :4, :], atol=0, rtol=0)
    assert not torch.allclose(out_x[:, :, 4:], out_y[:, :, 4:])


def test_lwsa_with_padding_output_in_a_window_ignores_input_outside_it():
    module = LocalWindowSelfAttention(4, 2, window_size=4).eval()
    x = torch.randn(1, 4, 6, 4, 4)  # padded to 8 along D: windows d < 4 and 4 <= d < 6 (+ 2 padding)
    y = x.clone()
    y[:, :, :4] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(module(x)[:, :, 4:], module(y)[:, :, 4:], atol=0, rtol=0)


def test_shifted_lwsa_does_not_mix_pre_shift_regions():
    # D = 8, window 4, shift 2: voxels 6, 7 and 0, 1 share a rolled window but must not interact
    module = LocalWindowSelfAttention(4, 2, window_size=(4, 1, 1), shift_size=(2, 0, 0)).eval()
    x = torch.randn(1, 4, 8, 1, 1)
    y = x.clone()
    y[:, :, 0] += 3.0
    with torch.no_grad():
        out_x, out_y = module(x), module(y)
    torch.testing.assert_close(out_x[:, :, 6:], out_y[:, :, 6:], atol=0, rtol=0)  # other region, same window
    torch.testing.assert_close(out_x[:, :, 2:6], out_y[:, :, 2:6], atol=0, rtol=0)  # other window
    assert not torch.allclose(out_x[:, :, 1], out_y[:, :, 1])  # same region: it does attend
    # without the shift, voxel 0 is in the window of voxels 0..3
    plain = LocalWindowSelfAttention(4, 2, window_size=(4, 1, 1)).eval()
    plain.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(x)[:, :, 3], plain(y)[:, :, 3])


def test_lwsa_weights_are_a_softmax_with_masked_entries_zero():
    module = LocalWindowSelfAttention(4, 2, window_size=4, shift_size=2).eval()
    with torch.no_grad():
        _, weights = module.forward_with_weights(torch.randn(2, 4, 8, 6, 8))
    assert weights.shape == (2 * 2 * 2 * 2, 2, 64, 64)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    mask = shifted_window_mask([8, 8, 8], [4, 4, 4], [2, 2, 2], [8, 6, 8], torch.device("cpu"))
    assert (weights.view(2, 8, 2, 64, 64) * mask[None, :, None]).abs().max() == 0


def test_lwsa_gradient_is_finite_with_padding_and_shift():
    module = LocalWindowSelfAttention(4, 2, window_size=4, shift_size=2, attn_drop=0.1)
    x = torch.randn(1, 4, 6, 5, 9, requires_grad=True)
    module(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lwca_shapes_and_weights():
    module = LocalWindowCrossAttention(8, 6, num_heads=2, window_size=4).eval()
    q, ctx = torch.randn(2, 3, 8, 4, 8, 4), torch.randn(2, 4, 6, 4, 8, 4)
    with torch.no_grad():
        out, weights = module.forward_with_weights(q, ctx)
    assert out.shape == q.shape
    assert weights.shape == (2 * 2, 2, 3 * 64, 4 * 64)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_lwca_output_depends_on_every_modality_within_the_window():
    module = LocalWindowCrossAttention(8, 6, num_heads=2, window_size=4).eval()
    q, ctx = torch.randn(1, 3, 8, 4, 4, 4), torch.randn(1, 4, 6, 4, 4, 4)
    with torch.no_grad():
        base = module(q, ctx)
        for m in range(4):
            changed = ctx.clone()
            changed[:, m] += torch.randn_like(changed[:, m])
            out = module(q, changed)
            for g in range(3):
                assert not torch.allclose(out[:, g], base[:, g]), f"query group {g} ignores modality {m}"


def test_lwca_is_local_and_query_groups_are_independent():
    module = LocalWindowCrossAttention(8, 6, num_heads=2, window_size=4).eval()
    q, ctx = torch.randn(1, 3, 8, 8, 4, 6), torch.randn(1, 4, 6, 8, 4, 6)  # W = 6 is padded to 8
    q2, ctx2 = q.clone(), ctx.clone()
    q2[..., 4:, :, :] += 1.0
    ctx2[..., 4:, :, :] += torch.randn_like(ctx2[..., 4:, :, :])
    ctx2[..., :4, :, 4:] -= 2.0  # the padded window along W
    q3 = q.clone()
    q3[:, 1] += 1.0
    with torch.no_grad():
        base = module(q, ctx)
        out = module(q2, ctx2)
        out_q3 = module(q3, ctx)
    torch.testing.assert_close(out[..., :4, :, :4], base[..., :4, :, :4], atol=0, rtol=0)
    assert not torch.allclose(out[..., 4:, :, :], base[..., 4:, :, :])
    # cross-attention: queries attend to the context only, so group 1 does not affect groups 0 and 2
    torch.testing.assert_close(out_q3[:, [0, 2]], base[:, [0, 2]], atol=0, rtol=0)
    assert not torch.allclose(out_q3[:, 1], base[:, 1])


def test_lwca_padding_keys_get_no_weight():
    module = LocalWindowCrossAttention(4, 4, num_heads=1, window_size=(4, 1, 1), relative_position_bias=False).eval()
    with torch.no_grad():
        _, weights = module.forward_with_weights(torch.randn(1, 2, 4, 5, 1, 1), torch.randn(1, 2, 4, 5, 1, 1))
    # D = 5 padded to 8: the second window holds voxel 4 and three padding voxels; tokens are group-major,
    # 4 per group, so the real query/key tokens of that window are 0 and 4
    assert weights.shape == (2, 1, 8, 8)
    assert weights[1, 0, [0, 4]][:, [1, 2, 3, 5, 6, 7]].abs().max() == 0
    assert (weights[1, 0, [0, 4]][:, [0, 4]] > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_torchscript_matches_eager():
    x = torch.randn(1, 8, 6, 8, 5)
    for module in (
        LocalWindowSelfAttention(8, 2, window_size=4, shift_size=2).eval(),
        LocalWindowTransformerBlock(8, 2, window_size=4, shift_size=2).eval(),
    ):
        torch.testing.assert_close(torch.jit.script(module)(x), module(x), atol=1e-6, rtol=1e-6)
    cross = LocalWindowCrossAttention(8, 4, num_heads=2, window_size=4).eval()
    q, ctx = torch.randn(1, 3, 8, 6, 8, 5), torch.randn(1, 4, 4, 6, 8, 5)
    torch.testing.assert_close(torch.jit.script(cross)(q, ctx), cross(q, ctx), atol=1e-6, rtol=1e-6)


def test_transformer_block_is_residual_and_local():
    block = LocalWindowTransformerBlock(8, 2, window_size=4).eval()
    x = torch.randn(1, 8, 8, 4, 4)
    y = x.clone()
    y[:, :, 4:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(block(x)[:, :, :4], block(y)[:, :, :4], atol=0, rtol=0)
        # zeroed attention/MLP outputs leave the identity
        for p in (block.attn.proj, block.mlp.linear2):
            p.weight.zero_()
            p.bias.zero_()
        torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 6, "num_heads": 4}, "multiple of num_heads"),
        ({"dim": 8, "num_heads": 2, "shift_size": 4}, "shift_size"),
        ({"dim": 8, "num_heads": 2, "window_size": (4, 4)}, "3 ints"),
        ({"dim": 8, "num_heads": 2, "window_size": 0}, "positive"),
        ({"dim": 8, "num_heads": 2, "attn_drop": 1.0}, "attn_drop"),
    ],
)
def test_lwsa_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalWindowSelfAttention(**kwargs)


def test_lwca_rejects_mismatched_inputs():
    module = LocalWindowCrossAttention(8, 4, num_heads=2)
    with pytest.raises(ValueError, match="same batch and spatial size"):
        module(torch.randn(1, 3, 8, 4, 4, 4), torch.randn(1, 4, 4, 4, 4, 8))
    with pytest.raises(ValueError, match="expected context"):
        module(torch.randn(1, 3, 8, 4, 4, 4), torch.randn(1, 4, 5, 4, 4, 4))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        LocalWindowCrossAttention(6, 4, num_heads=4)
