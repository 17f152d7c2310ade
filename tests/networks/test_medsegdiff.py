"""Tests for common/networks/medsegdiff.py (MedSegDiff noise predictor) with MONAI's diffusion inferer/schedulers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.networks.blocks.ff_parser import FFParser
from common.networks.medsegdiff import AttentiveFusion, DeterministicMedSegDiff, MedSegDiff, TimeConditionedResBlock

TINY = {"channels": (8, 16, 32), "attention_levels": (False, False, True), "norm_num_groups": 4, "num_heads": 2}


def _tiny(**overrides) -> MedSegDiff:
    return MedSegDiff(**{**TINY, "ff_parser_size": 16, **overrides})


@pytest.fixture(autouse=True)
def _seed_and_single_thread():
    """Fixed seed; one intra-op thread (tiny tensors: extra threads only add overhead), restored afterwards."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 4, 3, 5, 6)])
def test_attentive_fusion_equation(shape, residual):
    fusion = AttentiveFusion(shape[1], residual=residual)
    m_image, m_mask = torch.randn(shape) * 3 + 1, torch.randn(shape)

    def channel_layer_norm(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t.movedim(1, -1), (shape[1],)).movedim(-1, 1)

    expected = channel_layer_norm(m_image) * channel_layer_norm(m_mask) * m_image
    if residual:
        expected = m_image + expected
    torch.testing.assert_close(fusion(m_image, m_mask), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        fusion(m_image, m_mask[:, :, :-1])


def test_the_paper_fusion_is_the_default():
    assert not AttentiveFusion(4).residual
    assert all(not fusion.residual for fusion in _tiny().fusions)
    assert all(fusion.residual for fusion in _tiny(fusion_residual=True).fusions)


def test_deterministic_network_is_the_same_backbone_with_zero_mask_and_fixed_t():
    net = DeterministicMedSegDiff(timestep=0, **TINY, ff_parser_size=16)
    plain = _tiny()
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    image = torch.randn(2, 4, 16, 16)
    logits = net(image)
    assert logits.shape == (2, 1, 16, 16)
    expected = net.backbone(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), image)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(net(image), net(image.flip(-1)))  # it reads the image
    logits.sum().backward()
    assert net.backbone.image_stem.conv.weight.grad.abs().sum() > 0  # the condition encoder is trained
    with pytest.raises(ValueError, match="image must be"):
        net(torch.randn(2, 5, 16, 16))


@pytest.mark.parametrize("time_injection", ["add", "scale_shift"])
def test_res_block_uses_time_embedding(time_injection):
    block = TimeConditionedResBlock(2, 3, 8, 16, norm_num_groups=4, time_injection=time_injection)
    x = torch.randn(1, 3, 6, 6)
    out_a, out_b = block(x, torch.zeros(1, 16)), block(x, torch.ones(1, 16))
    assert out_a.shape == (1, 8, 6, 6)
    assert not torch.allclose(out_a, out_b)


@pytest.mark.parametrize(
    ("spatial_dims", "in_channels", "out_channels", "spatial"),
    [(2, 4, 1, (16, 24)), (2, 5, 3, (12, 20)), (3, 3, 3, (8, 12, 16)), (3, 1, 1, (4, 8, 4))],
)
def test_output_shape(spatial_dims, in_channels, out_channels, spatial):
    net = _tiny(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels)
    x = torch.randn(2, out_channels, *spatial)
    image = torch.randn(2, in_channels, *spatial)
    out = net(x, torch.tensor([3, 900]), image)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_deeper_configuration_3d():
    net = MedSegDiff(
        spatial_dims=3,
        in_channels=2,
        out_channels=1,
        channels=(4, 8),
        num_res_blocks=2,
        attention_levels=(True, True),
        num_heads=2,
        ff_parser_size=(8, 4, 8),
        norm_num_groups=2,
        time_injection="add",
        dropout=0.1,
        fusion_residual=True,
    )
    assert len(net.image_stages[0].res_blocks) == 2 and len(net.decoder_stages[0].res_blocks) == 2
    out = net(torch.randn(1, 1, 6, 4, 10), torch.tensor([999]), torch.randn(1, 2, 6, 4, 10))
    assert out.shape == (1, 1, 6, 4, 10)


def test_invalid_inputs_raise_value_error():
    net = _tiny()
    image, x, t = torch.randn(1, 4, 16, 16), torch.randn(1, 1, 16, 16), torch.tensor([5])
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 18, 16), t, torch.randn(1, 4, 18, 16))
    with pytest.raises(ValueError, match="context"):
        net(x, t, None)
    with pytest.raises(ValueError, match="context"):
        net(x, t, torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="noisy mask"):
        net(torch.randn(1, 2, 16, 16), t, image)
    with pytest.raises(ValueError, match="timesteps"):
        net(x, torch.tensor([1, 2, 3]), image)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"attention_levels": (False, True)}, "attention_levels"),
        ({"ff_parser_levels": (True,)}, "ff_parser_levels"),
        ({"num_heads": 3}, "num_heads"),
        ({"time_injection": "concat"}, "time_injection"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"ff_parser_size": 18}, "ff_parser_size"),
        ({"channels": (8,), "attention_levels": (False,)}, "channels"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kwargs)


@pytest.mark.parametrize("time_injection", ["add", "scale_shift"])
def test_prediction_depends_on_time_image_and_mask(time_injection):
    net = _tiny(time_injection=time_injection).eval()
    x, image = torch.randn(2, 1, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 10])
    reference = net(x, t, image)
    torch.testing.assert_close(net(x, t, image), reference)  # deterministic: no module is built in forward
    assert not torch.allclose(net(x, torch.tensor([600, 600]), image), reference, atol=1e-4)
    assert not torch.allclose(net(x, t, torch.randn(2, 4, 16, 16)), reference, atol=1e-4)
    assert not torch.allclose(net(torch.randn(2, 1, 16, 16), t, image), reference, atol=1e-4)


def test_timesteps_of_length_one_are_broadcast():
    net = _tiny().eval()
    x, image = torch.randn(3, 1, 8, 8), torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(net(x, torch.tensor([42.0]), image), net(x, torch.tensor([42, 42, 42]), image))


def test_ff_parsers_start_as_identity_and_are_placed_per_level():
    with_parsers = _tiny(ff_parser_levels=(True, False, True))
    without = _tiny(ff_parser_levels=(False, False, False))
    without.load_state_dict(with_parsers.state_dict(), strict=False)
    assert [isinstance(m, FFParser) for m in with_parsers.ff_parsers] == [True, False, True]
    assert with_parsers.ff_parsers[2].spatial_size == (4, 4)  # ff_parser_size 16 at level 2
    x, image, t = torch.randn(1, 1, 16, 24), torch.randn(1, 4, 16, 24), torch.tensor([7])
    torch.testing.assert_close(with_parsers(x, t, image), without(x, t, image), atol=1e-5, rtol=1e-4)


def test_training_loss_decreases():
    net = _tiny()
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    image = torch.randn(2, 4, 16, 16)
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float() * 2 - 1
    noise = torch.randn_like(mask)
    timesteps = torch.tensor([100, 700])
    noisy = scheduler.add_noise(original_samples=mask, noise=noise, timesteps=timesteps)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(net(noisy, timesteps, image), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # every parameter takes part (DistributedDataParallel requires it without find_unused_parameters)
    assert [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    # every FF-Parser map received a gradient, i.e. it is part of the computation
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in net.ff_parsers)


def test_diffusion_inferer_training_call_and_ddim_sampling():
    net = _tiny(out_channels=3).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    mask = (torch.rand(2, 3, 16, 16) > 0.5).float()
    image, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16, 16)
    timesteps = torch.randint(0, 1000, (2,)).long()
    prediction = inferer(
        inputs=mask, diffusion_model=net, noise=noise, timesteps=timesteps, condition=image, mode="crossattn"
    )
    assert prediction.shape == mask.shape
    direct = net(scheduler.add_noise(original_samples=mask, noise=noise, timesteps=timesteps), timesteps, image)
    torch.testing.assert_close(prediction, direct)

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(5)
    sample = inferer.sample(
        input_noise=torch.randn(2, 3, 16, 16),
        diffusion_model=net,
        scheduler=ddim,
        conditioning=image,
        mode="crossattn",
        verbose=False,
    )
    assert sample.shape == (2, 3, 16, 16)
    assert torch.isfinite(sample).all()


def test_single_tensor_form_is_image_then_mask_at_timestep_zero():
    net = _tiny().eval()
    image, x = torch.randn(2, 4, 16, 16), torch.randn(2, 1, 16, 16)
    stacked = torch.cat([image, x], dim=1)
    expected = net(x, torch.tensor([0, 0]), image)
    torch.testing.assert_close(net(stacked), expected)
    torch.testing.assert_close(net(x, context=image), expected)  # timesteps omitted alone: t = 0
    assert not torch.allclose(net(x, torch.tensor([500, 500]), image), expected, atol=1e-4)
    with pytest.raises(ValueError, match="concatenation"):
        net(torch.randn(2, 4, 16, 16))  # neither context nor in_channels + out_channels channels


def test_torchscript_matches_eager():
    """3D, additive time injection, several mask channels (the bundle's 2D export is checked by the harness)."""
    spatial = (8, 8, 16)
    net = _tiny(spatial_dims=3, in_channels=2, out_channels=3, time_injection="add").eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, net.out_channels, *spatial)
    image = torch.randn(2, net.in_channels, *spatial)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, t, image), net(x, t, image))
        stacked = torch.cat([image, x], dim=1)
        torch.testing.assert_close(scripted(stacked), net(stacked))


def test_gradient_checkpointing_of_the_encoders_keeps_outputs_and_gradients():
    plain = _tiny(dropout=0.1)  # dropout: the recomputation must replay the same masks
    checkpointed = _tiny(dropout=0.1, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    image, mask, t = torch.randn(2, 4, 16, 16), torch.randn(2, 1, 16, 16), torch.tensor([3, 500])
    outs, stored = [], []
    for net in (plain, checkpointed):
        saved: list[int] = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda x, saved=saved: saved.append(x.numel()) or x, lambda x: x):
            out = net.train()(mask, t, image)
        out.square().mean().backward()
        outs.append(out)
        stored.append(sum(saved))
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")
    assert stored[1] < 0.9 * stored[0], "checkpointing stores the encoders' activations"
