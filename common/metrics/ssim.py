"""Structural similarity (SSIM, Wang et al., IEEE TIP 13(4), 2004) with a separable Gaussian window.

MONAI's :func:`monai.metrics.regression.compute_ssim_and_cs` (behind ``SSIMMetric`` and ``SSIMLoss``) convolves
each local statistic with the dense ``win^d`` Gaussian kernel: 1331 taps per voxel at ``win = 11`` in 3D. The
Gaussian window is the outer product of 1D Gaussians, so filtering one axis at a time with ``win`` taps gives the
same local means at a fraction of the cost (about 7 times faster forward and backward on a 64^3 volume on CPU).
:func:`separable_ssim_map` computes exactly MONAI's quantity (same window, K1, K2, population statistics, the
map kept where the window fits) and is what the DC2Fusion loss and the fusion metrics use; the tests check it
against MONAI and scikit-image. Torch tensors are filtered with ``conv2d``/``conv3d`` (differentiable, any device);
numpy arrays with ``scipy.ndimage.correlate1d`` in float64 (CPU float64 convolutions in torch are slow).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["gaussian_window_1d", "separable_ssim_map"]


def gaussian_window_1d(win_size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised sampled Gaussian of MONAI's SSIM, ``(win_size,)``, taps at ``-(w-1)/2 ... (w-1)/2``."""
    if win_size < 1 or sigma <= 0:
        raise ValueError(f"win_size and sigma must be positive, got {win_size} and {sigma}.")
    dist = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    gauss = torch.exp(-((dist / sigma) ** 2) / 2)
    return (gauss / gauss.sum()).to(dtype)


def _local_mean(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local mean without padding: ``(B, C, *S) -> (B, C, *(S - win + 1))``, axis by axis."""
    spatial_dims = x.ndim - 2
    channels = x.shape[1]
    conv = F.conv3d if spatial_dims == 3 else F.conv2d
    for axis in range(spatial_dims):
        shape = [1, 1] + [1] * spatial_dims
        shape[2 + axis] = window.numel()
        x = conv(x, window.reshape(shape).expand(channels, *shape[1:]), groups=channels)
    return x


def _local_mean_numpy(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """:func:`_local_mean` for a float64 numpy ``(B, C, *S)`` array."""
    half = (window.size - 1) // 2
    for axis in range(2, x.ndim):
        x = ndimage.correlate1d(x, window, axis=axis, mode="constant")
    valid = (slice(None), slice(None)) + tuple(slice(half, n - (window.size - 1 - half)) for n in x.shape[2:])
    return x[valid]


def separable_ssim_map(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor | np.ndarray:
    """The SSIM map of two images where the window fits: ``(B, C, *S) x 2 -> (B, C, *(S - win_size + 1))``.

    ``SSIM = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))`` with
    Gaussian-weighted local statistics, ``C1 = (k1 * data_range)^2``, ``C2 = (k2 * data_range)^2``. 2D
    (``(B, C, H, W)``) or 3D (``(B, C, D, H, W)``); channels are filtered independently. Torch tensors are computed
    in their floating dtype and keep gradients; numpy arrays are computed in float64 and return a numpy map. The
    mean of the map is MONAI's ``SSIMMetric`` value.

    Args:
        x, y: images of one shape; every spatial size at least ``win_size``.
        data_range: intensity range (default 1.0).
        win_size: window edge in voxels (default 11).
        sigma: Gaussian standard deviation in voxels (default 1.5).
        k1, k2: stability constants (defaults 0.01, 0.03).
    """
    if x.shape != y.shape or x.ndim not in (4, 5):
        raise ValueError(
            f"x and y must share one (B, C, H, W) or (B, C, D, H, W) shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if min(x.shape[2:]) < win_size:
        raise ValueError(f"spatial size {tuple(x.shape[2:])} is smaller than the SSIM window {win_size}.")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}.")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    c = x.shape[1]
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        window = gaussian_window_1d(win_size, sigma, torch.float64).numpy()
        stats = _local_mean_numpy(np.concatenate((x, y, x * x, y * y, x * y), axis=1), window)
        mu_x, mu_y, mu_xx, mu_yy, mu_xy = (stats[:, i * c : (i + 1) * c] for i in range(5))
    else:
        if not x.is_floating_point():
            x = x.float()
        y = y.to(x.dtype)
        window = gaussian_window_1d(win_size, sigma, x.dtype).to(x.device)
        stats = _local_mean(torch.cat((x, y, x * x, y * y, x * y), dim=1), window)  # the five statistics, one pass
        mu_x, mu_y, mu_xx, mu_yy, mu_xy = stats.split(c, dim=1)
    sigma_x = mu_xx - mu_x * mu_x
    sigma_y = mu_yy - mu_y * mu_y
    sigma_xy = mu_xy - mu_x * mu_y
    contrast_structure = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
    return ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * contrast_structure
