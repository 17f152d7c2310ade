"""Region-aware contrastive loss (RCL) of HLWA-UNet, and its training objective with Dice.

"Hybrid Local Window Attention Assisted U-Net", MICCAI 2025, doi:10.1007/978-3-032-04937-7_22, Eq. 7.
The decoupled-representation branches give three region features ``f_a, f_b, f_c``; ``f_a`` is the
anchor, ``f_b`` the positive and ``f_c`` the negative:

    s+ = cos(g(f_a), g(f_b)) / tau,    s- = cos(g(f_a), g(f_c)) / tau
    L  = -log( exp(s+) / (exp(s+) + exp(s-)) ) = softplus(s- - s+)

``g`` is global average pooling (:func:`region_contrastive_loss`), or, in the region-aware variant
(:func:`masked_region_contrastive_loss`), pooling of ``f_a`` and ``f_b`` over the tumour mask and of
``f_c`` over its complement. The softplus form is the same quantity computed without overflow
(``1 / tau = 14.3`` scales cosines to logits up to about 14).

MONAI has no loss of this form (its ``ContrastiveLoss`` is SimCLR's NT-Xent over a batch of pairs),
hence this module; the Dice part of :class:`HLWALoss` is MONAI's ``DiceLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["HLWALoss", "RegionContrastiveLoss", "masked_region_contrastive_loss", "region_contrastive_loss"]

RCL_MODES = ("global", "masked")


def _check_features(f_a: torch.Tensor, f_b: torch.Tensor, f_c: torch.Tensor) -> None:
    if f_a.dim() < 3:
        raise ValueError(f"region features must be (B, C, *spatial), got f_a of shape {list(f_a.shape)}.")
    if f_a.shape != f_b.shape or f_a.shape != f_c.shape:
        raise ValueError(
            f"f_a, f_b, f_c must have the same shape, got {list(f_a.shape)}, {list(f_b.shape)}, {list(f_c.shape)}."
        )


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"temperature tau must be positive, got {tau}.")


def _contrast(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, tau: float) -> torch.Tensor:
    """Batch mean of ``-log(exp(s+) / (exp(s+) + exp(s-)))`` for pooled ``(B, C)`` vectors."""
    s_pos = F.cosine_similarity(anchor, positive, dim=1, eps=1e-8) / tau
    s_neg = F.cosine_similarity(anchor, negative, dim=1, eps=1e-8) / tau
    return F.softplus(s_neg - s_pos).mean()


def region_contrastive_loss(f_a: torch.Tensor, f_b: torch.Tensor, f_c: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Eq. 7 of HLWA-UNet with global average pooling: ``3 x (B, C, *spatial) -> ()``.

    Args:
        f_a: anchor region features.
        f_b: positive region features (pulled towards ``f_a``).
        f_c: negative region features (pushed away from ``f_a``).
        tau: temperature. Default 0.07.

    Returns:
        the batch-mean loss, a scalar in ``(0, log(1 + exp(2 / tau)))``.
    """
    _check_features(f_a, f_b, f_c)
    _check_tau(tau)
    dims = list(range(2, f_a.dim()))
    return _contrast(f_a.mean(dims), f_b.mean(dims), f_c.mean(dims), tau)


def _masked_mean(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, C, *S)`` over the voxels where ``weight (B, 1, *S)`` is 1; the global mean where it is empty."""
    dims = list(range(2, features.dim()))
    count = weight.sum(dims)  # (B, 1)
    masked = (features * weight).sum(dims) / count.clamp_min(1.0)
    return torch.where(count > 0, masked, features.mean(dims))


def masked_region_contrastive_loss(
    f_a: torch.Tensor, f_b: torch.Tensor, f_c: torch.Tensor, mask: torch.Tensor, tau: float = 0.07
) -> torch.Tensor:
    """Region-aware Eq. 7: ``f_a``, ``f_b`` pooled over the tumour, ``f_c`` over the background.

    ``3 x (B, C, *spatial), (B, 1 | K, *spatial') -> ()``

    The mask is binarised (any non-zero voxel is tumour; with ``K > 1`` region channels, e.g. TC/WT/ET,
    their union = WT) and resized to the feature grid by nearest-neighbour interpolation. The pooled
    vectors are L2-normalised, so the similarities are cosines. Empty regions: a sample whose resized
    mask has no tumour voxel pools ``f_a`` and ``f_b`` globally, and one with no background voxel pools
    ``f_c`` globally (the loss then equals the global variant for that term); the loss is never NaN.
    The mask carries no gradient.

    Args:
        f_a, f_b, f_c: anchor, positive and negative region features.
        mask: tumour mask or region map, same batch size, any spatial size.
        tau: temperature. Default 0.07.
    """
    _check_features(f_a, f_b, f_c)
    _check_tau(tau)
    if mask.dim() != f_a.dim() or mask.shape[0] != f_a.shape[0]:
        raise ValueError(
            f"mask must be (B, 1 | K, *spatial) with B={f_a.shape[0]} and {f_a.dim() - 2} spatial dims, "
            f"got {list(mask.shape)}."
        )
    tumour = (mask.detach() != 0).any(dim=1, keepdim=True).to(f_a.dtype)
    if tumour.shape[2:] != f_a.shape[2:]:
        tumour = F.interpolate(tumour, size=list(f_a.shape[2:]), mode="nearest")
    anchor = F.normalize(_masked_mean(f_a, tumour), dim=1)
    positive = F.normalize(_masked_mean(f_b, tumour), dim=1)
    negative = F.normalize(_masked_mean(f_c, 1.0 - tumour), dim=1)
    return _contrast(anchor, positive, negative, tau)


class RegionContrastiveLoss(nn.Module):
    """Region-aware contrastive loss (Eq. 7 of HLWA-UNet) as a module.

    ``forward(f_a, f_b, f_c, mask=None) -> ()``; see :func:`region_contrastive_loss` (``mode="global"``)
    and :func:`masked_region_contrastive_loss` (``mode="masked"``, needs ``mask``; training only, as it
    uses the label).

    Args:
        mode: ``"global"`` (global average pooling) or ``"masked"`` (tumour / background pooling).
            Default ``"global"``.
        tau: temperature. Default 0.07.
    """

    def __init__(self, mode: str = "global", tau: float = 0.07) -> None:
        super().__init__()
        if mode not in RCL_MODES:
            raise ValueError(f"mode must be one of {RCL_MODES}, got {mode!r}.")
        _check_tau(tau)
        self.mode = mode
        self.tau = tau

    def forward(
        self, f_a: torch.Tensor, f_b: torch.Tensor, f_c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.mode == "masked":
            if mask is None:
                raise ValueError('RegionContrastiveLoss(mode="masked") needs the tumour mask.')
            return masked_region_contrastive_loss(f_a, f_b, f_c, mask, self.tau)
        return region_contrastive_loss(f_a, f_b, f_c, self.tau)


class HLWALoss(nn.Module):
    """Training objective of HLWA-UNet: ``Dice(seg, target) + rcl_weight * RCL(f_a, f_b, f_c)``.

    Dice is MONAI's ``DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)`` over
    the region channels (as in the method's public code); RCL is :class:`RegionContrastiveLoss`.

    ``forward(pred, target)``: ``pred`` is either the network's training output ``(seg, f_a, f_b, f_c)``
    (Dice + weighted RCL) or a plain segmentation tensor (Dice only), so one loss object serves
    training and validation. ``seg`` and ``target`` are ``(B, 3, D, H, W)``: logits and the binary
    TC/WT/ET region map; in ``"masked"`` mode the tumour mask for RCL is the union of the target channels (WT).

    Args:
        rcl_weight: weight of the contrastive term. Default 0.1.
        tau: RCL temperature. Default 0.07.
        rcl_mode: ``"global"`` or ``"masked"``. Default ``"global"``.
    """

    def __init__(self, rcl_weight: float = 0.1, tau: float = 0.07, rcl_mode: str = "global") -> None:
        super().__init__()
        if rcl_weight < 0:
            raise ValueError(f"rcl_weight must be non-negative, got {rcl_weight}.")
        self.rcl_weight = rcl_weight
        self.dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
        self.rcl = RegionContrastiveLoss(mode=rcl_mode, tau=tau)

    def forward(
        self, pred: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.dice(pred, target)
        if len(pred) != 4:
            raise ValueError(
                f"expected the network output (seg, f_a, f_b, f_c) or a tensor, got a sequence of {len(pred)}."
            )
        seg, f_a, f_b, f_c = pred
        loss = self.dice(seg, target)
        if self.rcl_weight > 0:
            loss = loss + self.rcl_weight * self.rcl(f_a, f_b, f_c, target if self.rcl.mode == "masked" else None)
        return loss
