"""Tests for common/networks/transunet.py (tiny sizes: 64 x 64 slices, narrow layers)."""

from __future__ import annotations

import math

import pytest
import torch

from common.networks.transunet import TransUNet

TINY = dict(
    img_size=64,
    stem_channels=8,
    encoder_channels=(16, 32, 64),
    vit_layers=2,
    vit_heads=4,
    vit_mlp_dim=32,
    hidden_size=16,
    head_channels=16,
    decoder_channels=(16, 8, 8, 4),
    proj_dim=8,
)


@pytest.fixture(scope="module")
def model() -> TransUNet:
    torch.manual_seed(0)
    return TransUNet(in_channels=1, out_channels=2, save_attn=True, **TINY).eval()


def test_output_and_embedding_shapes(model):
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
    assert logits.shape == (3, 2, 64, 64)
    assert emb.shape == (3, 8)
    assert torch.all(emb.norm(dim=1) > 0)  # L2-normalisable


def test_attention_rows_sum_to_one_and_scale_is_inverse_sqrt_d(model):
    block = model.vit_blocks[0]
    captured = {}
    handle = block.attn.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64))
    handle.remove()
    maps = model.attention_maps()
    n_tokens, heads, d = (64 // 16) ** 2, 4, 16 // 4
    assert len(maps) == 2 and maps[0].shape == (2, heads, n_tokens, n_tokens)
    for att in maps:
        torch.testing.assert_close(att.sum(-1), torch.ones(2, heads, n_tokens))
    # recompute block 0's attention by hand from its (normalised) input and its qkv weights
    with torch.no_grad():
        qkv = block.attn.qkv(captured["x"]).reshape(2, n_tokens, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        logits = q @ k.transpose(-1, -2)
    torch.testing.assert_close(maps[0], torch.softmax(logits / math.sqrt(d), dim=-1))
    assert not torch.allclose(maps[0], torch.softmax(logits * math.sqrt(d), dim=-1), atol=1e-3)


def test_script_and_trace_match_eager(model):
    x = torch.rand(2, 1, 64, 64)
    # optimized_execution(False): skip the JIT's profiling passes, which only cost time on a tiny model
    with torch.no_grad(), torch.jit.optimized_execution(False):
        eager = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), eager)
        torch.testing.assert_close(torch.jit.trace(model, x, check_trace=False)(x), eager)


def test_embedding_uses_the_encoder_not_the_decoder_and_the_output_not_the_projection():
    torch.manual_seed(0)
    net = TransUNet(**TINY).train()
    decoder_stats = net.decoder[0].conv1.adn.N.running_mean.clone()
    net.embed(torch.rand(2, 1, 64, 64)).sum().backward()
    assert net.stem.conv.weight.grad.abs().sum() > 0
    assert net.vit_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    decoder = [p for m in (net.conv_more, net.decoder, net.segmentation_head) for p in m.parameters()]
    assert all(p.grad is None for p in decoder)
    assert torch.equal(decoder_stats, net.decoder[0].conv1.adn.N.running_mean)  # the decoder did not even run
    net.zero_grad(set_to_none=True)
    net(torch.rand(2, 1, 64, 64)).sum().backward()
    assert all(p.grad is None for p in net.projection.parameters())
    assert net.segmentation_head.weight.grad.abs().sum() > 0


def test_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        TransUNet(**{**TINY, "img_size": 40})
    with pytest.raises(ValueError, match="divisible by 4"):
        TransUNet(**{**TINY, "encoder_channels": (16, 30, 64)})
    with pytest.raises(ValueError, match="divisible by vit_heads"):
        TransUNet(**{**TINY, "hidden_size": 18})
    with pytest.raises(ValueError, match="decoder_channels"):
        TransUNet(**{**TINY, "decoder_channels": (8, 8)})
    net = TransUNet(**TINY)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 48))
    with pytest.raises(RuntimeError, match="save_attn"):
        net.attention_maps()


def test_other_input_sizes_resize_the_position_embeddings(model):
    # at img_size the learned embeddings are used unchanged; at other sizes they are resized to the token grid
    assert model._position_embedding(4, 4) is model.position_embedding
    resized = model._position_embedding(2, 3)
    assert resized.shape == (1, 6, 16)
    square = model.position_embedding.transpose(1, 2).reshape(1, 16, 4, 4)
    expected = torch.nn.functional.interpolate(square, size=(2, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        out = model(x)
        assert out.shape == (2, 2, 32, 48)
        torch.testing.assert_close(torch.jit.script(model)(x), out)
        assert model(torch.rand(1, 1, 16, 16)).shape == (1, 2, 16, 16)  # a single token
