"""Tests for common/networks/dpm_solver.py (DPM-Solver++(2M)) against closed-form solutions of the diffusion ODE.

For Gaussian data ``x_0 ~ N(mu, s^2)`` the exact noise prediction is known,
``eps*(x_t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)``, and the probability-flow ODE keeps the
standardised sample ``(x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` constant, so the exact end point of a
chain started from any ``x_{T-1}`` is known in closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.schedulers import NoiseSchedules

from common.networks.clipped_ddim import ClippedDDIMScheduler
from common.networks.dpm_solver import DPMSolverMultistepScheduler

MU, S = 0.3, 0.5

if "lambda_linear_test" not in NoiseSchedules.names:

    @NoiseSchedules.add_def("lambda_linear_test", "log-SNR linear in t from +4 to -4 (test only)")
    def _lambda_linear(num_train_timesteps: int):
        half_log_snr = torch.linspace(4.0, -4.0, num_train_timesteps, dtype=torch.float64)
        abar = torch.sigmoid(2 * half_log_snr)
        alphas = abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return 1 - alphas, alphas, abar


def _exact_noise(x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S * S + 1 - abar)


def _sample(scheduler, steps: int, x_start: torch.Tensor) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    x = x_start.clone()
    for t in scheduler.timesteps:
        x, _ = scheduler.step(_exact_noise(x, abar[int(t)]), int(t), x)
    return x


def _exact_end(scheduler, x_start: torch.Tensor) -> torch.Tensor:
    """The exact ODE solution from ``t = T - 1`` to ``t = 0``, then the final (exact) denoising step to abar = 1."""
    abar = scheduler.alphas_cumprod.double()
    first, last = abar[-1], abar[0]
    z = (x_start - first.sqrt() * MU) / (first * S * S + 1 - first).sqrt()
    x = last.sqrt() * MU + (last * S * S + 1 - last).sqrt() * z
    return (x - (1 - last).sqrt() * _exact_noise(x, last)) / last.sqrt()


def _errors(schedule: str, steps, **kwargs) -> dict[str, list[float]]:
    x_start = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    make = {
        "ddim": lambda: ClippedDDIMScheduler(1000, schedule=schedule, clip_sample=False),
        "dpm": lambda: DPMSolverMultistepScheduler(1000, schedule=schedule, clip_sample=False, **kwargs),
    }
    reference = _exact_end(make["ddim"](), x_start)
    return {
        name: [float((_sample(factory(), n, x_start) - reference).abs().mean()) for n in steps]
        for name, factory in make.items()
    }


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_second_order_convergence_where_the_grid_is_uniform_in_log_snr(lower_order_final):
    """Doubling the steps divides DPM-Solver++(2M)'s error by about 4 (second order), DDIM's by 2 (first order)."""
    errors = _errors("lambda_linear_test", (20, 40, 80), lower_order_final=lower_order_final)
    ddim, dpm = np.array(errors["ddim"]), np.array(errors["dpm"])
    assert np.all(ddim[:-1] / ddim[1:] > 1.8) and np.all(ddim[:-1] / ddim[1:] < 2.2)
    assert np.all(dpm[:-1] / dpm[1:] > 3.3)
    assert np.all(dpm < ddim / 9)


def test_more_accurate_than_ddim_on_the_linear_beta_schedule():
    """The bundle's schedule and grid: closer to the exact ODE solution than DDIM for the same network calls.

    Also what the module docstring quotes: without ``lower_order_final`` the second-order step into t = 0 is worse
    than DDIM at 10 to 40 steps.
    """
    steps = (10, 20, 40)
    with_final = _errors("linear_beta", steps)
    without = _errors("linear_beta", steps, lower_order_final=False)["dpm"]
    ddim = with_final["ddim"]
    np.testing.assert_allclose(ddim, [0.111, 0.056, 0.028], rtol=0.03)
    np.testing.assert_allclose(with_final["dpm"], [0.087, 0.019, 0.0005], rtol=0.03, atol=1e-4)
    np.testing.assert_allclose(without, [0.155, 0.097, 0.034], rtol=0.03)
    assert all(d < 0.8 * e for d, e in zip(with_final["dpm"], ddim))


def test_order_one_is_the_clipped_ddim_step_and_order_two_starts_with_it():
    torch.manual_seed(0)
    x_start = torch.randn(2, 1, 8, 8)
    outputs = [torch.randn(2, 1, 8, 8) for _ in range(6)]
    chains = {}
    for name, scheduler in {
        "ddim": ClippedDDIMScheduler(1000),
        "dpm1": DPMSolverMultistepScheduler(1000, solver_order=1),
        "dpm2": DPMSolverMultistepScheduler(1000),
    }.items():
        scheduler.set_timesteps(6)
        x, chain = x_start, []
        for t, eps in zip(scheduler.timesteps, outputs):
            x, x0 = scheduler.step(eps, int(t), x)
            chain.append((x, x0))
        chains[name] = chain
    for (a, a0), (b, b0) in zip(chains["ddim"], chains["dpm1"]):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a0, b0)
    torch.testing.assert_close(chains["dpm2"][0][0], chains["ddim"][0][0])  # the first step is first order
    assert not torch.allclose(chains["dpm2"][1][0], chains["ddim"][1][0], atol=1e-3)  # then second order
    assert chains["dpm2"][-1][1].abs().max() <= 1  # the data prediction is clipped to the mask range


def test_steps_must_follow_the_schedule():
    scheduler = DPMSolverMultistepScheduler(1000)
    scheduler.set_timesteps(4)
    steps = [int(t) for t in scheduler.timesteps]
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    x1, _ = scheduler.step(eps, steps[0], x)
    with pytest.raises(ValueError, match="in order"):
        scheduler.step(eps, steps[2], x1)  # skips steps[1]
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(eps[..., :2], steps[1], x1[..., :2])
    again, _ = scheduler.step(eps, steps[0], x)  # a new chain from the first timestep resets the state
    torch.testing.assert_close(again, x1)
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(1000, solver_order=3)
