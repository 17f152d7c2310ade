"""Tests for common/engines/inpainting_gan.py with tiny networks on 8 x 16 x 16 volumes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.engines.inpainting_gan import InpaintingGanTrainer
from common.networks.covid_gan import InpaintingGenerator, PatchDiscriminator3D, denoising_noise

SHAPE = (1, 8, 16, 16)
NOISE = {"slice_fraction": 0.5, "amplitude": 0.3}


def volumes(n: int, seed: int, lesion: bool) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lung = torch.zeros(SHAPE)
        lung[:, 1:7, 2:14, 2:14] = 1
        image = (0.1 + 0.02 * torch.rand(SHAPE, generator=g)) * lung
        if lesion:
            image[:, 3:5, 5:9, 5:9] = 0.5
        out.append({"image": image, "lung": lung})
    return out


def make_trainer(**kwargs) -> InpaintingGanTrainer:
    torch.manual_seed(0)
    g = InpaintingGenerator(channels=(4, 8), noise_channels=0)  # no bottleneck noise: a deterministic G
    d = PatchDiscriminator3D(channels=(4, 8))
    args = dict(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(volumes(3, 0, True), batch_size=2),
        healthy_data_loader=DataLoader(volumes(1, 1, False), batch_size=2),
        g_network=g,
        g_optimizer=torch.optim.Adam(g.parameters(), 1e-3),
        d_network=d,
        d_optimizer=torch.optim.Adam(d.parameters(), 1e-3),
        noise_kwargs=NOISE,
        noise_seed=7,
    )
    args.update(kwargs)
    return InpaintingGanTrainer(**args)


def test_one_iteration_computes_the_documented_losses():
    trainer = make_trainer(train_data_loader=DataLoader(volumes(2, 0, True), batch_size=2))
    g0, d0 = copy.deepcopy(trainer.g_network), copy.deepcopy(trainer.d_network)
    trainer.run()
    out = trainer.state.output
    covid = torch.stack([v["image"] for v in volumes(2, 0, True)])
    healthy = torch.stack([v["image"] for v in volumes(1, 1, False)])
    lung = torch.stack([v["lung"] for v in volumes(1, 1, False)])
    with torch.no_grad():
        fake = g0(covid) * lung[:1]
        bce = lambda logits, real: F.binary_cross_entropy(torch.sigmoid(logits), torch.full_like(logits, real))  # noqa: E731
        d_loss = 0.5 * (bce(d0(healthy), 1.0) + bce(d0(fake), 0.0))
        noisy = denoising_noise(healthy, torch.Generator().manual_seed(7), **NOISE)
        recon = (g0(noisy) * lung - healthy).abs().mean()
    assert out["d_loss"] == pytest.approx(d_loss.item(), rel=1e-4)
    assert out["recon_loss"] == pytest.approx(recon.item(), rel=1e-4)
    assert out["g_loss"] == pytest.approx(out["adv_loss"] + 10.0 * out["recon_loss"], rel=1e-6)
    assert out["loss"] == out["g_loss"]
    # the inpainted volume is confined to the lungs, and both networks were updated
    assert torch.all(out["pred"][lung.expand(2, *SHAPE) == 0] == 0)
    assert any(not torch.equal(a, b) for a, b in zip(g0.parameters(), trainer.g_network.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0.parameters(), trainer.d_network.parameters()))


def test_the_healthy_loader_is_cycled_and_weights_are_honoured():
    trainer = make_trainer(max_epochs=2, adversarial_weight=0.0, recon_weight=1.0)
    trainer.run()  # 2 epochs x 2 COVID batches, 1 healthy batch: the healthy loader restarts every iteration
    assert trainer.state.iteration == 4 and trainer._healthy_epoch == 4
    assert trainer.state.output["g_loss"] == pytest.approx(trainer.state.output["recon_loss"], rel=1e-6)
    assert all(
        p.is_contiguous(memory_format=torch.channels_last_3d) for p in trainer.g_network.parameters() if p.dim() == 5
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match="not both 0"):
        make_trainer(adversarial_weight=0.0, recon_weight=0.0)
    with pytest.raises(ValueError, match="slice_fraction"):
        make_trainer(noise_kwargs={"slice_fraction": 0.0})
    trainer = make_trainer(healthy_data_loader=DataLoader([], batch_size=2))
    with pytest.raises(ValueError, match="no healthy"):
        trainer.run()
