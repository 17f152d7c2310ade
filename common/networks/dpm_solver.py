"""DPM-Solver++(2M): a second-order multistep sampler of the diffusion ODE, for eps-prediction networks.

Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv 2211.01095 (2022), Algorithm 2 ("DPM-Solver++(2M)"). MedSegDiff's official code offers it beside DDIM; MONAI has
no DPM-Solver and diffusers is not a dependency of this collection, so the update is written here from the paper.

Notation (the paper's, for the discrete VP schedule of MONAI's schedulers): ``alpha_t = sqrt(abar_t)``,
``sigma_t = sqrt(1 - abar_t)``, the half log-SNR ``lambda_t = log(alpha_t / sigma_t)``, and the network's
eps-prediction turned into a data prediction, thresholded to the signal range as the paper allows for data
prediction (a mask lives in ``[-1, 1]``)::

    x0_i = clip((x_{t_i} - sigma_{t_i} eps_theta(x_{t_i}, t_i)) / alpha_{t_i}, -1, 1)

From ``t_i`` to the next time ``t_{i+1}`` of the grid, with ``h = lambda_{t_{i+1}} - lambda_{t_i}``::

    x_{t_{i+1}} = (sigma_{t_{i+1}} / sigma_{t_i}) x_{t_i} + alpha_{t_{i+1}} (1 - exp(-h)) D_i

- first order (the first step, and a step into ``sigma = 0``): ``D_i = x0_i``; this is exactly the DDIM step (eta 0)
  with the noise re-derived from the clipped ``x0``, i.e. :class:`~common.networks.clipped_ddim.ClippedDDIMScheduler`;
- second order (every other step): ``D_i = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1}`` with
  ``r = h_{i-1} / h`` (the previous step's ``h`` over this one's), which reuses the previous step's data prediction,
  so each step still costs one network call.

``exp(-h)`` is computed as ``(sigma_{t_{i+1}} alpha_{t_i}) / (sigma_{t_i} alpha_{t_{i+1}})``, which stays finite for
the last step into ``abar = 1`` (``sigma = 0``, ``lambda = inf``); that step is always first order (``r = 0`` there).

The grid is MONAI's DDIM grid (``n`` network calls at ``round(linspace(T - 1, 0, n))``, then ``abar = 1``), so DDIM
and DPM-Solver++ with the same ``n`` cost the same and see the same timesteps. On the linear-beta schedule that grid is
very uneven in ``lambda`` at its end (10 steps: ``h`` = 0.8 into ``t = 111``, then 3.6 into ``t = 0``), and the
second-order extrapolation into ``t = 0`` (``r = 0.2``) is then less accurate than a first-order step.
``lower_order_final=True`` (default) takes the last two steps at first order, the counterpart of diffusers'
option of that name. Measured on Gaussian data, where the exact ODE solution is known (``tests/networks/
test_dpm_solver.py``), mean absolute error of the sample at 10 / 20 / 40 steps: DDIM 0.111 / 0.056 / 0.028,
DPM-Solver++(2M) 0.155 / 0.097 / 0.034 without and 0.087 / 0.019 / 0.0005 with ``lower_order_final``. On a schedule
uniform in ``lambda`` the solver converges at second order (error / 4 per doubling of the steps) either way.
"""

from __future__ import annotations

import torch

from common.networks.clipped_ddim import ClippedDDIMScheduler, predicted_original_sample

__all__ = ["DPMSolverMultistepScheduler"]


class DPMSolverMultistepScheduler(ClippedDDIMScheduler):
    """DPM-Solver++ (multistep, order 1 or 2) on the timestep grid of :class:`ClippedDDIMScheduler`.

    A drop-in scheduler of ``DiffusionInferer.sample`` and of
    :class:`~common.engines.diffusion.DiffusionSegmentationInferer`: ``set_timesteps(n)``, then ``step`` once per
    timestep in order; ``n`` steps cost ``n`` network calls. The grid is ``round(linspace(T - 1, 0, n))`` (MONAI's DDIM
    grid), then ``abar = 1`` (or ``alphas_cumprod[0]`` with ``set_alpha_to_one=False``). The step keeps the previous
    data prediction (multistep state); the state is reset by ``set_timesteps`` and whenever a chain starts again at the
    first timestep, and a step out of order is an error. See the module docstring for the update.

    Args:
        num_train_timesteps: ``T`` of the training schedule.
        schedule: member of MONAI's ``NoiseSchedules`` (``"linear_beta"``, with ``beta_start``/``beta_end`` in
            ``schedule_args``).
        solver_order: 2 (DPM-Solver++(2M), default) or 1 (equal to the clipped DDIM step).
        lower_order_final: take the last two steps at first order (default True; see the module docstring).
        clip_sample: threshold the data prediction to ``[clip_sample_min, clip_sample_max]`` (default True).
        set_alpha_to_one, steps_offset, prediction_type, clip_sample_min, clip_sample_max: as in MONAI's
            ``DDIMScheduler``; ``prediction_type`` is converted to the data prediction first.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        solver_order: int = 2,
        lower_order_final: bool = True,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order}.")
        self.solver_order = int(solver_order)
        self.lower_order_final = bool(lower_order_final)
        super().__init__(  # ends with set_timesteps, which resets the multistep state
            num_train_timesteps,
            schedule,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            clip_sample_min=clip_sample_min,
            clip_sample_max=clip_sample_max,
            **schedule_args,
        )

    def _reset(self) -> None:
        self._previous_x0: torch.Tensor | None = None
        self._previous_h: torch.Tensor | None = None
        self._next_index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._reset()

    def _alpha_sigma(self, timestep: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` as 0-d tensors of ``like``'s dtype and device; ``timestep < 0`` is the final point."""
        abar = self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod
        abar = abar.to(like.device, torch.float64)
        return abar.sqrt().to(like.dtype), (1 - abar).clamp(min=0).sqrt().to(like.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DPM-Solver++ step ``x_t -> x_next``: returns ``(x_next, x0_hat)`` (shapes of ``sample``).

        ``generator`` is accepted for the schedulers' common signature and unused (the solver is deterministic).
        """
        t = int(timestep)
        steps = [int(s) for s in self.timesteps]
        if steps and t == steps[0]:
            self._reset()  # a new chain
        if self._next_index >= len(steps) or steps[self._next_index] != t:
            expected = steps[self._next_index] if self._next_index < len(steps) else "none (the chain is complete)"
            raise ValueError(
                f"DPM-Solver++ is a multistep method: step() must follow the timesteps {steps} in order; got t = {t}, "
                f"expected {expected}. Call set_timesteps() to start a new chain."
            )
        if self._previous_x0 is not None and self._previous_x0.shape != sample.shape:
            raise ValueError(
                f"the sample's shape {tuple(sample.shape)} changed within a chain (was "
                f"{tuple(self._previous_x0.shape)}); sample every item of a chain in one step call."
            )
        nxt = self.previous_timestep(t)
        alpha_t, sigma_t = self._alpha_sigma(t, sample)
        alpha_n, sigma_n = self._alpha_sigma(nxt, sample)
        x0 = predicted_original_sample(self, model_output, sample, alpha_t**2)

        # exp(-h) = (sigma_n / alpha_n) / (sigma_t / alpha_t), finite (0) for the final sigma = 0
        exp_neg_h = (sigma_n * alpha_t) / (sigma_t * alpha_n)
        final = self.lower_order_final and self._next_index >= len(steps) - 2
        first_order = self.solver_order == 1 or self._previous_x0 is None or final or float(sigma_n) == 0.0
        h = None if float(sigma_n) == 0.0 else -torch.log(exp_neg_h)
        if first_order:
            d = x0
        else:
            r = self._previous_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._previous_x0
        x_next = (sigma_n / sigma_t) * sample + alpha_n * (1 - exp_neg_h) * d

        self._previous_x0, self._previous_h = x0, h
        self._next_index += 1
        return x_next, x0
