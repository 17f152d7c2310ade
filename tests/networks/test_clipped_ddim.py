"""Tests for common/networks/clipped_ddim.py (DDIM with the noise re-derived from the clipped x_0)."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler

from common.networks.clipped_ddim import ClippedDDIMScheduler


def test_previous_timestep_follows_the_schedule():
    scheduler = ClippedDDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    steps = [int(t) for t in scheduler.timesteps]
    assert steps[:3] == [999, 888, 777] and steps[-1] == 0
    assert [scheduler.previous_timestep(t) for t in steps] == [*steps[1:], -1]


def test_equals_monai_ddim_without_clipping_at_unit_stride():
    torch.manual_seed(0)
    ours = ClippedDDIMScheduler(num_train_timesteps=50, clip_sample=False)
    monai = DDIMScheduler(num_train_timesteps=50, clip_sample=False)
    ours.set_timesteps(50)
    monai.set_timesteps(50)
    sample, output = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    for t in (49, 30, 1, 0):
        for eta in (0.0, 0.5):
            expected = monai.step(output, t, sample, eta=eta, generator=torch.Generator().manual_seed(3))
            got = ours.step(output, t, sample, eta=eta, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(got, expected)


def test_true_noise_gives_the_forward_process_sample():
    scheduler = ClippedDDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    x0 = (torch.rand(1, 1, 8, 8) > 0.5).float() * 2 - 1
    eps = torch.randn_like(x0)
    abar = scheduler.alphas_cumprod
    x_t = abar[888].sqrt() * x0 + (1 - abar[888]).sqrt() * eps
    x_prev, x0_hat = scheduler.step(eps, 888, x_t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(x_prev, abar[777].sqrt() * x0 + (1 - abar[777]).sqrt() * eps, atol=1e-4, rtol=0)


def test_step_stays_consistent_with_the_clipped_estimate():
    """A wrong noise estimate at large t: the next sample implies the same noise as x_t given the clipped x_0."""
    torch.manual_seed(1)
    scheduler, monai = ClippedDDIMScheduler(num_train_timesteps=1000), DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    monai.set_timesteps(10)
    x_t, eps_hat = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)  # eps_hat unrelated to x_t
    abar = scheduler.alphas_cumprod
    x_prev, x0_hat = scheduler.step(eps_hat, 999, x_t)
    assert x0_hat.abs().max() <= 1 and (x0_hat.abs() == 1).float().mean() > 0.5  # mostly clipped
    implied_before = (x_t - abar[999].sqrt() * x0_hat) / (1 - abar[999]).sqrt()
    implied_after = (x_prev - abar[888].sqrt() * x0_hat) / (1 - abar[888]).sqrt()
    torch.testing.assert_close(implied_after, implied_before, atol=1e-4, rtol=0)
    monai_prev, _ = monai.step(eps_hat, 999, x_t)
    assert not torch.allclose(monai_prev, x_prev, atol=1e-2)  # MONAI keeps the raw eps_hat


def test_eta_adds_noise_and_zero_eta_is_deterministic():
    scheduler = ClippedDDIMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(10)
    sample, output = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    t = int(scheduler.timesteps[2])
    a = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(0))[0]
    b = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(1))[0]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(scheduler.step(output, t, sample)[0], scheduler.step(output, t, sample)[0])
