"""Initialisation of segmentation networks trained with a sigmoid Dice loss on rare foreground.

With PyTorch's default initialisation the output layer's bias is near 0, so every voxel starts at
``sigmoid(0) = 0.5``: in a brain tumour crop where under 1 % of the voxels are tumour, the squared-prediction Dice
loss then sees a false-positive mass hundreds of times the true one, and its gradient per voxel is tiny
until that mass is gone, so the first tens of steps learn almost nothing. Starting the output at a small prior
probability (the bias ``log(p / (1 - p))``, as RetinaNet's focal-loss classifier does, Lin et al., ICCV 2017)
removes that phase. MONAI has no such initialiser (``monai.networks.utils`` offers ``normal_init`` and
``icnr_init`` only), hence this module.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["init_output_prior"]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def init_output_prior(network: nn.Module, prior: float | None = 0.01) -> nn.Module:
    """Set the bias of ``network``'s output convolution to ``log(prior / (1 - prior))``; return ``network``.

    The output convolution is the last ``nn.Conv1d/2d/3d`` registered in the network (its 1x1 head in MONAI's
    ``SegResNet``, ``SwinUNETR``, ``DynUNet``/``UnetOutBlock`` and in :class:`~common.networks.hlwa_unet.HLWAUNet`),
    so after this call a sigmoid output starts near ``prior`` wherever the head's weighted input is small.

    Args:
        network: the segmentation network (modified in place).
        prior: initial foreground probability in (0, 1); ``None`` leaves the network as it is.

    Raises:
        ValueError: ``prior`` outside (0, 1), or no convolution with a bias in ``network``.
    """
    if prior is None:
        return network
    if not 0.0 < float(prior) < 1.0:
        raise ValueError(f"prior must be a probability in (0, 1), got {prior}")
    convolutions = [m for m in network.modules() if isinstance(m, _CONVOLUTIONS)]
    if not convolutions or convolutions[-1].bias is None:
        raise ValueError(f"{type(network).__name__} has no output convolution with a bias to initialise")
    nn.init.constant_(convolutions[-1].bias, math.log(prior / (1.0 - prior)))
    return network
