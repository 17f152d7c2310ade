"""Training loss of diffusion segmentation (MedSegDiff): noise regression plus an optional loss on the predicted mask.

Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic Model", MIDL 2023 (arXiv
2211.00611), train with the simplified DDPM objective ``E || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t)
eps, I, t) ||^2``. An auxiliary term on the step's clean-mask estimate ``x0_hat`` is a common addition to
diffusion segmentation (it is optional here and off by default, so that the default is the paper's loss).

Why not an MSE on ``x0_hat``: ``x0_hat - x_0 = sqrt((1 - abar_t) / abar_t) (eps - eps_hat)``, so such a term is only
the noise MSE re-weighted towards large ``t`` (by up to ``2.5e4`` at ``t = T - 1`` with the linear schedule). A Dice
loss on the estimate mapped to ``[0, 1]`` instead rewards overlap of the predicted mask, which the noise MSE does
not see. MONAI's ``DiceLoss`` computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiffusionSegmentationLoss"]


class DiffusionSegmentationLoss(nn.Module):
    """``L = MSE(eps_hat, eps) + x0_weight * Dice((clamp(x0_hat, -1, 1) + 1) / 2, (x_0 + 1) / 2)``.

    Inputs are what :class:`~common.engines.diffusion.DiffusionSegmentationTrainingInferer` and
    :class:`~common.engines.diffusion.SegmentationDiffusionPrepareBatch` produce, halves stacked on the channel axis:
    ``pred = [eps_hat, x0_hat]`` and ``target = [eps, x_0]``, both ``(B, 2C, *S)``, masks in ``[-1, 1]``. The Dice term
    (MONAI ``DiceLoss``, soft, per sample and channel, averaged) sees the clamped estimate, because ``x0_hat`` is
    unbounded at large ``t``. With ``x0_weight = 0`` (default) the Dice term is not computed and the loss is the
    paper's noise MSE.

    Args:
        x0_weight: weight of the auxiliary Dice loss on ``x0_hat`` (non-negative; default 0, off).

    Returns a scalar tensor.
    """

    def __init__(self, x0_weight: float = 0.0) -> None:
        super().__init__()
        if x0_weight < 0:
            raise ValueError(f"x0_weight must be non-negative, got {x0_weight}.")
        self.x0_weight = float(x0_weight)
        self.dice = DiceLoss(sigmoid=False, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim < 3 or pred.shape[1] % 2:
            raise ValueError(
                "pred and target must both be (B, 2C, *spatial) = [noise, mask] halves, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}."
            )
        channels = pred.shape[1] // 2
        loss = F.mse_loss(pred[:, :channels].float(), target[:, :channels].float())
        if self.x0_weight > 0:
            x0_hat = (pred[:, channels:].float().clamp(-1, 1) + 1) / 2
            x0 = (target[:, channels:].float() + 1) / 2
            loss = loss + self.x0_weight * self.dice(x0_hat, x0)
        return loss
