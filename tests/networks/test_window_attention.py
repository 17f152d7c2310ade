"""Tests of common/networks/blocks/window_attention.py (LWSA / LWCA of HLWA-UNet)."""

from __future__ import annotations

import copy
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
    sdpa_window_attention,
    shifted_window_mask,
    window_attention,
    window_attention_mask,
    window_partition,
    window_reverse,
    window_token_regions,
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


# ---------------------------------------------------------------- fused (SDPA) path against the explicit one


def _reference_lwca(module: LocalWindowCrossAttention, query, context, value_gate=None) -> torch.Tensor:
    """LWCA written voxel by voxel on the *declared* (unclamped) window grid: each real voxel of each query group
    attends to the real voxels of its window in every context group, one softmax; values times ``value_gate``.

    Windows larger than the map are padded rather than clamped here, so agreement also shows that clamping
    attends over the same voxels (DC2Fusion's attention padded small stages before it used this block)."""
    _, gq, cq, *size = query.shape
    gk = context.shape[1]
    heads, hd = module.num_heads, cq // module.num_heads
    window = module.window_size
    positions = list(itertools.product(*[range(s) for s in size]))
    q = module.q(query[0].permute(0, 2, 3, 4, 1).reshape(gq, -1, cq)).reshape(gq, -1, heads, hd)
    k, v = module.kv(context[0].permute(0, 2, 3, 4, 1).reshape(gk, len(positions), -1)).chunk(2, dim=-1)
    k, v = k.reshape(gk, -1, heads, hd), v.reshape(gk, -1, heads, hd)
    if value_gate is not None:
        v = v * value_gate[0].reshape(heads, hd)
    win = [tuple(p[i] // window[i] for i in range(3)) for p in positions]
    out = torch.zeros(gq, len(positions), cq)
    for i, p in enumerate(positions):
        keys = [j for j in range(len(positions)) if win[j] == win[i]]
        bias = 0.0
        if module.position_bias is not None:
            t = module.window_size
            idx = [
                (p[0] % t[0] - positions[j][0] % t[0] + t[0] - 1) * (2 * t[1] - 1) * (2 * t[2] - 1)
                + (p[1] % t[1] - positions[j][1] % t[1] + t[1] - 1) * (2 * t[2] - 1)
                + (p[2] % t[2] - positions[j][2] % t[2] + t[2] - 1)
                for j in keys
            ]
            bias = module.position_bias.table[idx].T.repeat(1, gk)  # (heads, Gk * len(keys)), group-major
        keys_k = k[:, keys].reshape(-1, heads, hd)  # (Gk * len(keys), heads, hd)
        keys_v = v[:, keys].reshape(-1, heads, hd)
        for g in range(gq):
            logits = torch.einsum("hd,khd->hk", q[g, i], keys_k) * hd**-0.5 + bias
            out[g, i] = torch.einsum("hk,khd->hd", logits.softmax(-1), keys_v).reshape(cq)
    return module.proj(out).reshape(gq, *size, cq).permute(0, 4, 1, 2, 3).unsqueeze(0)


@pytest.mark.parametrize(
    "size, window, gate",
    [
        ((5, 4, 6), 4, False),  # padding along D and W
        ((2, 6, 3), (4, 4, 2), True),  # D smaller than the window (clamped), H and W padded
        ((4, 4, 4), 2, True),
    ],
)
def test_lwca_matches_voxel_by_voxel_reference(size, window, gate):
    module = LocalWindowCrossAttention(4, 6, num_heads=2, window_size=window).eval()
    query, context = torch.randn(1, 2, 4, *size), torch.randn(1, 3, 6, *size)
    value_gate = torch.rand(1, 4) if gate else None
    expected = _reference_lwca(module, query, context, value_gate)
    with torch.no_grad():
        for fused in (True, False):
            module.fused_attention = fused
            torch.testing.assert_close(module(query, context, value_gate), expected, atol=1e-5, rtol=1e-5)
        got, _ = module.forward_with_weights(query, context, value_gate)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _masks(padded, window, shift, valid, groups=(1, 1)):
    regions, valid_tokens = window_token_regions(padded, window, shift, valid, torch.device("cpu"))
    gq, gk = groups
    return window_attention_mask(
        regions.repeat(1, gq), valid_tokens.repeat(1, gq), regions.repeat(1, gk), valid_tokens.repeat(1, gk)
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    "padded, window, shift, valid, groups",
    [
        ([8, 4, 4], [4, 4, 4], [0, 0, 0], [8, 4, 4], (1, 1)),  # no mask needed (all real, no shift)
        ([8, 8, 4], [4, 4, 4], [0, 0, 0], [6, 5, 4], (1, 1)),  # windows crossing the padding
        ([8, 8, 4], [4, 4, 4], [2, 2, 0], [7, 6, 4], (1, 1)),  # shifted windows crossing the padding
        ([8, 4, 4], [4, 4, 4], [0, 0, 0], [5, 4, 3], (2, 3)),  # cross-attention: Nq = 2N, Nk = 3N
    ],
)
def test_sdpa_equals_explicit_attention_in_values_and_gradients(with_bias, padded, window, shift, valid, groups):
    mask = _masks(padded, window, shift, valid, groups)
    mask = mask if mask.any() else None
    n_windows, n = _masks(padded, window, shift, valid).shape[:2]
    batch, heads, hd = 2, 2, 4  # batch 2: the per-window mask is repeated over the batch-major windows
    gq, gk = groups
    q = torch.randn(batch * n_windows, heads, gq * n, hd, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch * n_windows, heads, gk * n, hd, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch * n_windows, heads, gk * n, hd, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(heads, gq * n, gk * n, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (q, k, v, bias) if t is not None]
    explicit, _ = window_attention(q, k, v, hd**-0.5, bias, mask)
    fused = sdpa_window_attention(q, k, v, hd**-0.5, bias, mask)
    torch.testing.assert_close(fused, explicit, atol=1e-10, rtol=1e-10)
    upstream = torch.randn_like(explicit)
    grads_explicit = torch.autograd.grad(explicit, inputs, upstream)
    grads_fused = torch.autograd.grad(fused, inputs, upstream)
    for name, a, b in zip("qkvb", grads_fused, grads_explicit):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"gradient of {name}")


def _lwsa_pair(**kwargs):
    fused = LocalWindowSelfAttention(8, 2, window_size=4, **kwargs)
    explicit = LocalWindowSelfAttention(8, 2, window_size=4, fused_attention=False, **kwargs)
    explicit.load_state_dict(fused.state_dict())
    return fused, explicit


@pytest.mark.parametrize("shift, rpb", [(0, True), (2, True), (2, False)])
def test_lwsa_fused_equals_explicit_in_training_and_evaluation(shift, rpb):
    fused, explicit = _lwsa_pair(shift_size=shift, relative_position_bias=rpb)
    x = torch.randn(2, 8, 6, 9, 5)  # padded along every axis
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = fused.train()(x1), explicit.train()(x2)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out1)
    out1.backward(upstream)
    out2.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p1), p2 in zip(fused.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), explicit.eval()(x), atol=1e-5, rtol=1e-5)


def _attention_ops(module, *inputs, grad):
    with torch.profiler.profile() as prof, torch.set_grad_enabled(grad):
        module(*inputs)
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_fused_kernel_is_used_where_pytorch_has_one():
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"  # PyTorch's fused CPU kernel
    fused, explicit = _lwsa_pair(shift_size=2)
    x = torch.randn(2, 8, 6, 9, 5)
    # inference with bias and shift/padding mask (it takes the 4D additive mask), and with the bias alone
    assert flash in _attention_ops(fused.eval(), x, grad=False)
    assert not _attention_ops(explicit.eval(), x, grad=False)
    plain, _ = _lwsa_pair()
    assert flash in _attention_ops(plain.eval(), torch.randn(2, 8, 8, 4, 8), grad=False)
    # training with a learned bias on the CPU: the explicit path (the fused CPU kernel cannot differentiate it)
    assert not _attention_ops(fused.train(), x, grad=True)
    no_bias, _ = _lwsa_pair(shift_size=2, relative_position_bias=False)
    assert flash in _attention_ops(no_bias.train(), x, grad=True)
    cross = LocalWindowCrossAttention(8, 4, num_heads=2, window_size=4).eval()
    q, ctx = torch.randn(2, 3, 8, 6, 4, 5), torch.randn(2, 4, 4, 6, 4, 5)
    assert flash in _attention_ops(cross, q, ctx, grad=False)


def test_lwca_value_gate_scales_the_values_per_sample_and_channel():
    module = LocalWindowCrossAttention(4, 4, num_heads=2, window_size=2).eval()
    q, ctx = torch.randn(2, 1, 4, 4, 2, 4), torch.randn(2, 1, 4, 4, 2, 4)
    with torch.no_grad():
        plain = module(q, ctx)
        torch.testing.assert_close(module(q, ctx, torch.ones(2, 4)), plain)
        zero = module(q, ctx, torch.zeros(2, 4))
        torch.testing.assert_close(zero, module.proj.bias.view(1, 1, 4, 1, 1, 1).expand_as(zero))
        # a gate per sample: sample 1 gated, sample 0 not (windows are batch-major)
        gate = torch.stack([torch.ones(4), torch.tensor([0.5, 2.0, 0.0, 1.0])])
        gated = module(q, ctx, gate)
        torch.testing.assert_close(gated[0], plain[0])
        # the gate is constant over tokens, so it equals scaling the attention output before the projection
        before_projection = copy.deepcopy(module)
        before_projection.proj.weight.copy_(torch.eye(4))
        before_projection.proj.bias.zero_()
        attended = before_projection(q, ctx)[1].movedim(1, -1)  # (1, D, H, W, C)
        expected = torch.nn.functional.linear(attended * gate[1], module.proj.weight, module.proj.bias)
        torch.testing.assert_close(gated[1], expected.movedim(-1, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="value_gate"):
        module(q, ctx, torch.ones(2, 3))
