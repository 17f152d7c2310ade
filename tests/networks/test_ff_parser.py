"""Tests for common/networks/blocks/ff_parser.py (MedSegDiff's FF-Parser)."""

from __future__ import annotations

import pytest
import torch

from common.networks.blocks.ff_parser import FFParser, rfft_grid_size


def _frequency_grid(spatial: tuple[int, ...]) -> list[torch.Tensor]:
    """Normalised frequencies (cycles/sample) of every rfftn bin, one tensor per axis, broadcast to the rfft grid."""
    freqs = [torch.fft.fftfreq(n) for n in spatial[:-1]] + [torch.fft.rfftfreq(spatial[-1])]
    return list(torch.meshgrid(*freqs, indexing="ij"))


@pytest.mark.parametrize(
    ("shape", "reference"),
    [((2, 3, 15, 22), (15, 22)), ((2, 3, 15, 22), 8), ((1, 2, 9, 12, 17), (9, 12, 17)), ((1, 2, 9, 12, 17), 6)],
)
def test_identity_initialisation_returns_input(shape, reference):
    torch.manual_seed(0)
    parser = FFParser(shape[1], len(shape) - 2, reference)
    x = torch.randn(shape)
    y = parser(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_rfft_grid_size_matches_torch():
    for spatial in [(15, 22), (9, 12, 17), (8, 8)]:
        assert rfft_grid_size(spatial) == tuple(torch.fft.rfftn(torch.zeros(spatial)).shape)


def test_low_pass_removes_checkerboard_and_keeps_smooth_signal():
    height, width = 16, 20
    parser = FFParser(1, 2, (height, width))
    fy, fx = _frequency_grid((height, width))
    low = ((fy.abs() <= 0.25) & (fx.abs() <= 0.25)).float()
    with torch.no_grad():
        parser.weight[0, 0] = low
        parser.weight[0, 1] = 0.0
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checkerboard = ((yy + xx) % 2).float() * 2 - 1
    smooth = torch.cos(2 * torch.pi * xx / width)  # one cycle per image: a low frequency
    y = parser((smooth + checkerboard)[None, None])[0, 0]
    torch.testing.assert_close(y, smooth, atol=1e-5, rtol=0)


def test_low_pass_at_another_size_still_filters():
    """The stored map is resampled by normalised frequency: a low-pass learnt at 16x16 stays a low-pass at 32x48."""
    parser = FFParser(1, 2, 16)
    fy, fx = _frequency_grid((16, 16))
    with torch.no_grad():
        parser.weight[0, 0] = ((fy.abs() <= 0.25) & (fx.abs() <= 0.25)).float()
        parser.weight[0, 1] = 0.0
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(48), indexing="ij")
    checkerboard = ((yy + xx) % 2).float() * 2 - 1
    constant = torch.full((32, 48), 0.7)
    y = parser((constant + checkerboard)[None, None])[0, 0]
    torch.testing.assert_close(y, constant, atol=1e-5, rtol=0)


def test_resampled_response_follows_normalised_frequency():
    parser = FFParser(1, 2, 16)
    fy, fx = _frequency_grid((16, 16))
    with torch.no_grad():
        parser.weight[0, 0] = torch.exp(-(fy**2 + fx**2) / 0.05)
        parser.weight[0, 1] = 0.0
    response = parser.frequency_response((32, 24))[0]
    gy, gx = _frequency_grid((32, 24))
    assert response.shape == (32, 13)
    torch.testing.assert_close(response.real, torch.exp(-(gy**2 + gx**2) / 0.05), atol=0.05, rtol=0)
    torch.testing.assert_close(response.real[0, 0], torch.tensor(1.0))  # zero frequency maps to zero frequency


def test_resampling_is_exact_for_a_map_linear_in_frequency_3d():
    """Linear interpolation reproduces a map linear in normalised frequency, inside the stored frequency range."""
    parser = FFParser(1, 3, (8, 8, 8))
    _, fy, fx = _frequency_grid((8, 8, 8))
    with torch.no_grad():
        parser.weight[0, 0] = 1 + fy
        parser.weight[0, 1] = fx
    response = parser.frequency_response((12, 16, 9))[0]
    _, gy, gx = _frequency_grid((12, 16, 9))
    inside = gy <= 3 / 8  # the stored full axis of 8 bins spans [-4/8, 3/8]
    torch.testing.assert_close(response.real[inside], (1 + gy)[inside], atol=1e-5, rtol=0)
    torch.testing.assert_close(response.imag, gx, atol=1e-5, rtol=0)


def test_reference_size_uses_stored_map_exactly():
    parser = FFParser(2, 3, (4, 6, 8))
    with torch.no_grad():
        parser.weight.normal_()
    response = parser.frequency_response((4, 6, 8))
    torch.testing.assert_close(response, torch.complex(parser.weight[:, 0], parser.weight[:, 1]))


def test_per_channel_maps_and_complex_phase():
    torch.manual_seed(1)
    parser = FFParser(2, 2, (8, 10))
    with torch.no_grad():
        parser.weight[1] = 0.0  # channel 1: everything blocked
        parser.weight[0, 0] = -1.0  # channel 0: A = -1 + 0j negates
    x = torch.randn(3, 2, 8, 10)
    y = parser(x)
    torch.testing.assert_close(y[:, 0], -x[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, 1], torch.zeros_like(x[:, 1]), atol=1e-6, rtol=0)


def test_map_is_trainable():
    parser = FFParser(2, 2, 8)
    loss = parser(torch.randn(2, 2, 12, 12)).square().sum()
    loss.backward()
    assert parser.weight.grad is not None and parser.weight.grad.abs().sum() > 0


def test_float64_and_init_value():
    parser = FFParser(1, 2, (6, 6), init_value=0.5 + 0j)
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    y = parser(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, 0.5 * x)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        FFParser(2, 1, 8)
    with pytest.raises(ValueError, match="spatial_size"):
        FFParser(2, 2, (8, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        FFParser(0, 2, 8)
    with pytest.raises(ValueError, match="FFParser expects"):
        FFParser(2, 2, 8)(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("spatial_dims", "reference", "shape"), [(2, 8, (2, 3, 15, 22)), (3, (4, 6, 8), (1, 3, 4, 6, 8))]
)
def test_torchscript_matches_eager_with_and_without_resampling(spatial_dims, reference, shape):
    torch.manual_seed(2)
    parser = FFParser(3, spatial_dims, reference)
    with torch.no_grad():
        parser.weight.normal_()
    scripted = torch.jit.script(parser)
    x = torch.randn(shape)
    torch.testing.assert_close(scripted(x), parser(x))
    assert not torch.allclose(parser(x), x, atol=1e-3)  # the random map really filters
