"""Losses of the COVID-19 TransUNet stage: supervised contrastive, enhanced contrastive, sensitivity BCE.

El Fahsi et al. (TransUNet on the 3D GAN pseudo-masks of Shabani et al., Computers in Biology and
Medicine 2022): each epoch a contrastive phase on slice embeddings labelled by pseudo-lesion burden
("high" = 1, "low" = 0, see :func:`common.data.pseudo_masks.slice_classes`) and a segmentation phase
with ``MSE(sigmoid(o), m) + sensitivity-enhanced BCE``.

Equation numbers: the full text of neither paper was available to this project (only abstracts), so the losses
below cite the stage they belong to (the TransUNet's contrastive phase and segmentation phase) rather than an
equation number, which would have to be guessed; the formulas are those of the project's method notes
(``METHODS.md``, section 3).

MONAI's ``ContrastiveLoss`` is the unsupervised SimCLR (NT-Xent) loss over augmented pairs; it takes no
class labels, so the supervised form is written here. The public code's defects avoided: its
"features" were the flattened output map (here: a projection head, see
:meth:`common.networks.transunet.TransUNet.embed`), and its batches held one class
only, which makes the term ~0 (here a single-class batch is an error).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "EnhancedSupConLoss",
    "SegmentationLoss",
    "SensitivityBCELoss",
    "SupConLoss",
    "enhanced_contrastive_loss",
    "sensitivity_bce_loss",
    "supervised_contrastive_loss",
]


def _contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float, log_weight: torch.Tensor) -> torch.Tensor:
    """Mean over valid anchors of ``-log(w_i P_i / (w_i P_i + N_i))``, computed with log-sum-exp."""
    if z.dim() != 2:
        raise ValueError(f"z must be (B, D) embeddings, got shape {tuple(z.shape)}")
    labels = labels.reshape(-1)
    if labels.numel() != z.shape[0]:
        raise ValueError(f"labels must have one entry per embedding: {labels.numel()} labels for {z.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if torch.unique(labels).numel() < 2:
        raise ValueError(
            "the batch holds a single class: the contrastive term has no negatives and is meaningless; "
            "build batches with both classes (e.g. balanced high/low-burden slices)"
        )
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature  # (B, B) cosine similarity / T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    positives, negatives = same & ~eye, ~same
    anchors = positives.any(dim=1)  # anchors whose class has another member in the batch
    if not anchors.any():
        raise ValueError("no anchor has a positive (every class appears once in the batch)")
    # keep only valid anchors *before* the log-sum-exp: rows without positives would give -inf and NaN gradients
    sim, positives, negatives = sim[anchors], positives[anchors], negatives[anchors]
    neg_inf = torch.finfo(sim.dtype).min
    log_p = torch.logsumexp(sim.masked_fill(~positives, neg_inf), dim=1) + log_weight[anchors]
    log_n = torch.logsumexp(sim.masked_fill(~negatives, neg_inf), dim=1)
    return (torch.logaddexp(log_p, log_n) - log_p).mean()


def supervised_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss in the COVID TransUNet's sum form, ``(B, D), (B,) -> scalar``.

    El Fahsi et al., contrastive phase (equation number unavailable, see the module docstring).

    With ``z`` L2-normalised and ``S_ij = exp(z_i . z_j / T)``::

        P_i = sum_{j != i, y_j = y_i} S_ij,   N_i = sum_{y_j != y_i} S_ij,
        L = mean_i -log(P_i / (P_i + N_i))

    over the anchors ``i`` that have at least one positive (the diagonal ``j = i`` is excluded). This
    is the "sum inside the log" form, not the per-positive average of Khosla et al. 2020.

    Args:
        z: embeddings ``(B, D)``, normalised here.
        labels: class per embedding ``(B,)`` (e.g. 1 = high, 0 = low burden).
        temperature: ``T``. Default 0.1.

    Raises:
        ValueError: the batch holds one class only (the loss would have no negatives), no anchor has a
            positive, or shapes disagree.
    """
    return _contrastive(z, labels, temperature, torch.zeros(z.shape[0], device=z.device, dtype=z.dtype))


def enhanced_contrastive_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    sensitivity_weight: float = 1.5,
    positive_class: int = 1,
) -> torch.Tensor:
    """Enhanced contrastive loss: :func:`supervised_contrastive_loss` with ``P`` weighted for high anchors.

    El Fahsi et al., contrastive phase, "enhanced" form (equation number unavailable, see the module docstring).

    Exact reading used: for anchors of ``positive_class`` (the "high" pseudo-lesion burden slices)
    ``P_i`` is multiplied by ``w = sensitivity_weight`` in the numerator *and* the denominator,
    ``L_i = -log(w P_i / (w P_i + N_i))``; other anchors keep ``w = 1``. Weighting only the numerator
    would add the constant ``-log w`` and leave the gradients unchanged. Note the effect: ``w > 1`` acts
    as a margin ``log w`` granted to the high anchors' positives (their terms and gradients shrink),
    ``w < 1`` demands tighter high-burden clusters.

    Args:
        z, labels, temperature: as :func:`supervised_contrastive_loss`.
        sensitivity_weight: ``w > 0``. Default 1.5.
        positive_class: label of the "high" class. Default 1.
    """
    if sensitivity_weight <= 0:
        raise ValueError(f"sensitivity_weight must be > 0, got {sensitivity_weight}")
    high = labels.reshape(-1).to(z.device) == positive_class
    log_weight = high.to(z.dtype) * math.log(sensitivity_weight)
    return _contrastive(z, labels, temperature, log_weight)


def sensitivity_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """Sensitivity-enhanced BCE: ``BCEWithLogits(o, m) * (1 + beta * (1 - sigmoid(o)) * m)``, any shape.

    El Fahsi et al., segmentation phase (equation number unavailable, see the module docstring).

    Lesion pixels (``m = 1``) predicted with low probability get up to ``1 + beta`` times the BCE, so a
    missed lesion pixel costs more than a false positive of the same confidence. The weight is part of
    the loss (not detached), as in the formula.

    Args:
        logits: ``o``, any shape.
        target: ``m`` in [0, 1], same shape.
        beta: extra weight of missed lesion pixels, >= 0. Default 2.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    target = target.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = loss * (1.0 + beta * (1.0 - torch.sigmoid(logits)) * target)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class SupConLoss(nn.Module):
    """Module form of :func:`supervised_contrastive_loss`: ``forward(z (B, D), labels (B,)) -> scalar``."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supervised_contrastive_loss(z, labels, self.temperature)


class EnhancedSupConLoss(nn.Module):
    """Module form of :func:`enhanced_contrastive_loss`: ``forward(z (B, D), labels (B,)) -> scalar``."""

    def __init__(self, temperature: float = 0.1, sensitivity_weight: float = 1.5, positive_class: int = 1) -> None:
        super().__init__()
        if temperature <= 0 or sensitivity_weight <= 0:
            raise ValueError(f"temperature and sensitivity_weight must be > 0, got {temperature}, {sensitivity_weight}")
        self.temperature = temperature
        self.sensitivity_weight = sensitivity_weight
        self.positive_class = positive_class

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return enhanced_contrastive_loss(z, labels, self.temperature, self.sensitivity_weight, self.positive_class)


class SensitivityBCELoss(nn.Module):
    """Module form of :func:`sensitivity_bce_loss`: ``forward(logits, target) -> scalar``."""

    def __init__(self, beta: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.beta = beta
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sensitivity_bce_loss(logits, target, self.beta, self.reduction)


class SegmentationLoss(nn.Module):
    """Segmentation-phase loss: ``mse_weight * MSE(sigmoid(o), m) + bce_weight * sensitivity BCE(o, m)``.

    El Fahsi et al., segmentation phase: MSE plus the sensitivity-enhanced loss (equation numbers unavailable, see
    the module docstring).

    ``forward(logits (B, 1, H, W), target (B, 1, H, W)) -> scalar``; any equal shapes work.

    Args:
        beta: see :func:`sensitivity_bce_loss`. Default 2.
        mse_weight: weight of the MSE term. Default 1.
        bce_weight: weight of the sensitivity-enhanced BCE term. Default 1.
    """

    def __init__(self, beta: float = 2.0, mse_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        if beta < 0 or mse_weight < 0 or bce_weight < 0:
            raise ValueError(f"beta, mse_weight and bce_weight must be >= 0, got {beta}, {mse_weight}, {bce_weight}")
        self.beta = beta
        self.mse_weight = mse_weight
        self.bce_weight = bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
        target = target.to(logits.dtype)
        mse = F.mse_loss(torch.sigmoid(logits), target)
        return self.mse_weight * mse + self.bce_weight * sensitivity_bce_loss(logits, target, self.beta)
