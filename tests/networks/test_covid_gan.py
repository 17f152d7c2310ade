"""Tests for common/networks/covid_gan.py (tiny sizes: volumes 16 x 32 x 32)."""

from __future__ import annotations

import pytest
import torch

from common.networks.covid_gan import (
    InpaintingGenerator,
    MultiScaleResidualBlock,
    PatchDiscriminator3D,
    denoising_noise,
    fractal_noise,
)


@pytest.fixture(scope="module")
def generator() -> InpaintingGenerator:
    torch.manual_seed(0)
    return InpaintingGenerator(channels=(4, 8, 16, 32), noise_channels=4).eval()


def test_generator_shape_range_and_noise(generator):
    x = torch.rand(2, 1, 16, 32, 32)
    assert generator.noise_shape(x.shape) == (2, 4, 2, 4, 4)
    n1, n2 = torch.rand(2, 4, 2, 4, 4), torch.rand(2, 4, 2, 4, 4)
    with torch.no_grad():
        y1, y1_again, y2 = generator(x, n1), generator(x, n1), generator(x, n2)
    assert y1.shape == x.shape
    assert y1.min() >= 0 and y1.max() <= 1
    torch.testing.assert_close(y1, y1_again)  # a given noise makes the output deterministic
    assert (y1 - y2).abs().max() > 1e-4  # and the noise changes the output
    with torch.no_grad():
        assert not torch.equal(generator(x), generator(x))  # default: fresh uniform noise per call


def test_generator_validates_sizes(generator):
    with pytest.raises(ValueError, match="divisible by 8"):
        generator(torch.rand(1, 1, 12, 32, 32))
    with pytest.raises(ValueError, match="noise must have shape"):
        generator(torch.rand(1, 1, 16, 32, 32), torch.rand(1, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="5D input"):
        generator(torch.rand(1, 16, 32, 32))
    with pytest.raises(ValueError, match="noise_channels"):
        InpaintingGenerator(noise_channels=-1)
    with pytest.raises(ValueError, match="odd"):
        InpaintingGenerator(channels=(4, 8), multiscale_kernels=(1, 2))
    no_noise = InpaintingGenerator(channels=(4, 8), noise_channels=0)
    with pytest.raises(ValueError, match="noise_channels=0"):
        no_noise(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 0, 2, 2, 2))


def test_generator_trains_end_to_end():
    torch.manual_seed(0)
    gen = InpaintingGenerator(channels=(4, 8), noise_channels=2)
    x = torch.rand(1, 1, 8, 8, 8)
    gen(x).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters() if p.requires_grad)


def test_multiscale_block_is_residual():
    block = MultiScaleResidualBlock(3, 4, (1, 3, 5))
    x = torch.randn(1, 4, 6, 6, 6)
    assert len(block.branches) == 3 and block(x).shape == x.shape
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()  # every branch now outputs 0, so only the identity path is left
    torch.testing.assert_close(block(x), x)


def test_discriminator_patch_logits():
    torch.manual_seed(0)
    disc = PatchDiscriminator3D(channels=(8, 16, 32))
    x = torch.rand(3, 1, 16, 32, 32, requires_grad=True)
    out = disc(x)
    assert out.shape == (3, 1, 2, 4, 4)
    out[0].sum().backward()
    # every layer learns, and the input gets the gradient the generator's adversarial loss trains on
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert x.grad[0].abs().sum() > 0 and torch.isfinite(x.grad).all()
    # one volume's logits do not depend on the others of the batch (no batch statistics mixing real and fake)
    assert torch.count_nonzero(x.grad[1:]) == 0
    with pytest.raises(ValueError, match=">= 8"):
        disc(torch.rand(1, 1, 4, 32, 32))


def test_discriminator_learns_to_tell_two_kinds_of_volume_apart():
    torch.manual_seed(0)
    disc = PatchDiscriminator3D(channels=(4, 8))
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    bce = torch.nn.BCEWithLogitsLoss()
    real = torch.rand(4, 1, 8, 16, 16)
    fake = torch.nn.functional.avg_pool3d(torch.rand(4, 1, 8, 16, 16), 3, 1, 1)  # smoother than the real ones
    losses = []
    for _ in range(40):
        loss = bce(disc(real), torch.ones(4, 1, 2, 4, 4)) + bce(disc(fake), torch.zeros(4, 1, 2, 4, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert disc(real).mean() > 0 > disc(fake).mean()  # real patches score above fake ones


def test_fractal_noise_is_smooth_and_normalised():
    g = torch.Generator().manual_seed(0)
    noise = fractal_noise(3, (32, 32), generator=g)
    assert noise.shape == (3, 32, 32)
    torch.testing.assert_close(noise.flatten(1).abs().amax(1), torch.ones(3))
    white = torch.rand(3, 32, 32) * 2 - 1
    step = (noise[:, :, 1:] - noise[:, :, :-1]).abs().mean()
    assert step < 0.25 * (white[:, :, 1:] - white[:, :, :-1]).abs().mean()
    torch.testing.assert_close(noise, fractal_noise(3, (32, 32), generator=torch.Generator().manual_seed(0)))


def test_denoising_noise_touches_only_random_foreground_slices():
    vol = torch.full((2, 1, 16, 32, 32), 0.5)
    vol[:, :, :, :, :4] = 0.0  # background (outside the lungs)
    noisy = denoising_noise(vol, torch.Generator().manual_seed(1), slice_fraction=0.25, amplitude=0.3)
    assert noisy.shape == vol.shape and noisy.min() >= 0 and noisy.max() <= 1
    changed = (noisy != vol).flatten(3).any(-1)[:, 0]  # (B, D)
    assert changed.sum(1).tolist() == [4, 4]  # round(0.25 * 16) slices per volume
    assert not torch.equal(changed[0], changed[1])  # slices drawn per volume
    assert torch.all(noisy[..., :4] == 0)  # background untouched
    again = denoising_noise(vol, torch.Generator().manual_seed(1), slice_fraction=0.25, amplitude=0.3)
    torch.testing.assert_close(noisy, again)
    with pytest.raises(ValueError, match="slice_fraction"):
        denoising_noise(vol, slice_fraction=0.0)


def test_generator_2d_variant():
    gen = InpaintingGenerator(channels=(4, 8, 16), noise_channels=2, spatial_dims=2)
    x = torch.rand(2, 1, 32, 32)
    assert gen.noise_shape(x.shape) == (2, 2, 8, 8) and gen(x).shape == x.shape
    with pytest.raises(ValueError, match="spatial_dims"):
        InpaintingGenerator(spatial_dims=1)


def test_discriminator_2d_variant_pairs_with_the_2d_generator():
    gen = InpaintingGenerator(channels=(4, 8, 16), noise_channels=2, spatial_dims=2)
    disc = PatchDiscriminator3D(channels=(4, 8), spatial_dims=2)
    out = disc(gen(torch.rand(2, 1, 32, 32)))
    assert out.shape == (2, 1, 8, 8)
    assert all(m.weight.dim() == 4 for m in disc.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="4D input"):
        disc(torch.rand(2, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="spatial_dims"):
        PatchDiscriminator3D(spatial_dims=1)
