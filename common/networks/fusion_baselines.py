"""Classical MRI-PET fusion methods, the baselines DC2Fusion is compared with (no training, no parameters learnt).

- :func:`average_fusion`: voxel-wise mean ``(MRI + PET) / 2``;
- :func:`maximum_fusion`: voxel-wise maximum;
- :func:`laplacian_pyramid_fusion`: Laplacian pyramid (Burt & Adelson 1985), choose-max-abs details, averaged base;
- :func:`guided_filter_fusion`: guided filtering fusion, GFF (Li, Kang & Hu, IEEE TIP 22(7), 2013).

All take one MRI and one PET of the same shape, numpy arrays or torch tensors (returned as given), and work in the
image's own dimension: the last ``min(ndim, 3)`` axes are spatial, so a 3D volume is fused in 3D, not slice by
slice, and leading axes (batch, channel) are fused one by one. :data:`BASELINES` names them for configs and
benchmarks. The metrics they are scored with are in :mod:`common.metrics.fusion`.

MONAI, scipy and scikit-image have neither a pyramid fusion nor a guided filter (OpenCV's contrib
``ximgproc.guidedFilter`` is 2D only), so both are written here on ``scipy.ndimage`` filters; a guided filter is a
few box filters, which ``scipy.ndimage.uniform_filter`` computes in any dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "BASELINES",
    "average_fusion",
    "guided_filter",
    "guided_filter_fusion",
    "laplacian_pyramid_fusion",
    "maximum_fusion",
]

ArrayLike = np.ndarray | torch.Tensor


def _check_sources(mri: ArrayLike, pet: ArrayLike) -> None:
    if tuple(mri.shape) != tuple(pet.shape):
        raise ValueError(f"mri and pet must have the same shape, got {tuple(mri.shape)} and {tuple(pet.shape)}.")
    if isinstance(mri, torch.Tensor) != isinstance(pet, torch.Tensor):
        raise ValueError("mri and pet must both be numpy arrays or both torch tensors.")


def _fuse_spatial(mri: ArrayLike, pet: ArrayLike, fuse: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> ArrayLike:
    """Apply ``fuse(a, b)`` (float64 images of ``min(ndim, 3)`` axes) to every leading index; numpy or torch out."""
    _check_sources(mri, pet)
    a = mri.detach().cpu().numpy() if isinstance(mri, torch.Tensor) else np.asarray(mri)
    b = pet.detach().cpu().numpy() if isinstance(pet, torch.Tensor) else np.asarray(pet)
    a, b = a.astype(np.float64), b.astype(np.float64)
    spatial = min(a.ndim, 3)
    if spatial < 1:
        raise ValueError("fusion needs at least one spatial axis.")
    flat_a = a.reshape((-1, *a.shape[a.ndim - spatial :]))
    flat_b = b.reshape(flat_a.shape)
    fused = np.stack([fuse(x, y) for x, y in zip(flat_a, flat_b)]).reshape(a.shape)
    if isinstance(mri, torch.Tensor):
        return torch.as_tensor(fused, dtype=mri.dtype, device=mri.device)
    return fused


def average_fusion(mri: ArrayLike, pet: ArrayLike) -> ArrayLike:
    """Voxel-wise mean ``(MRI + PET) / 2``; any shape, numpy or torch (returned as given)."""
    _check_sources(mri, pet)
    return (mri + pet) / 2


def maximum_fusion(mri: ArrayLike, pet: ArrayLike) -> ArrayLike:
    """Voxel-wise maximum ``max(MRI, PET)``; any shape, numpy or torch (returned as given)."""
    _check_sources(mri, pet)
    return torch.maximum(mri, pet) if isinstance(mri, torch.Tensor) else np.maximum(mri, pet)


def _downsample(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma, mode="nearest")[tuple(slice(None, None, 2) for _ in range(x.ndim))]


def _upsample(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation back to ``shape``: fine index ``j`` reads coarse position ``j / 2`` on every axis."""
    for axis, size in enumerate(shape):
        position = np.arange(size) / 2.0
        low = np.minimum(np.floor(position).astype(int), x.shape[axis] - 1)
        high = np.minimum(low + 1, x.shape[axis] - 1)
        weight = (position - low).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
        x = np.take(x, low, axis=axis) * (1 - weight) + np.take(x, high, axis=axis) * weight
    return x


def _laplacian_pyramid(x: np.ndarray, levels: int, sigma: float) -> list[np.ndarray]:
    pyramid = []
    for _ in range(levels):
        coarse = _downsample(x, sigma)
        pyramid.append(x - _upsample(coarse, x.shape))
        x = coarse
    pyramid.append(x)  # the low-pass base
    return pyramid


def laplacian_pyramid_fusion(mri: ArrayLike, pet: ArrayLike, levels: int = 4, sigma: float = 1.0) -> ArrayLike:
    """Laplacian pyramid fusion (Burt & Adelson 1985): choose-max-abs detail coefficients, averaged base.

    Each level blurs with a Gaussian (``sigma`` voxels) and keeps every second voxel; the expansion is linear
    interpolation, and reconstruction inverts the decomposition exactly, so fusing an image with itself returns it.

    Args:
        mri, pet: same shape, e.g. ``(D, H, W)`` or ``(B, 1, D, H, W)``.
        levels: detail levels (default 4).
        sigma: Gaussian blur before each down-sampling, in voxels (default 1.0).
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}.")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")

    def fuse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pa, pb = _laplacian_pyramid(a, levels, sigma), _laplacian_pyramid(b, levels, sigma)
        out = 0.5 * (pa[-1] + pb[-1])
        for da, db in zip(reversed(pa[:-1]), reversed(pb[:-1])):
            out = _upsample(out, da.shape) + np.where(np.abs(da) >= np.abs(db), da, db)
        return out

    return _fuse_spatial(mri, pet, fuse)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Guided filter (He, Sun & Tang, IEEE TPAMI 35(6), 2013) of ``source`` by ``guide``, same shape, any dimension.

    The output is locally linear in the guide, ``q = mean(a) I + mean(b)`` with, in every box of edge
    ``2 radius + 1`` voxels, ``a = cov(I, p) / (var(I) + eps)`` and ``b = mean(p) - a mean(I)``; box means are
    ``scipy.ndimage.uniform_filter`` with replicated edges.
    """
    size = 2 * int(radius) + 1

    def box(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=size, mode="nearest")

    mean_i, mean_p = box(guide), box(source)
    a = (box(guide * source) - mean_i * mean_p) / (box(guide * guide) - mean_i**2 + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def guided_filter_fusion(
    mri: ArrayLike,
    pet: ArrayLike,
    base_size: int = 31,
    saliency_radius: int = 5,
    saliency_sigma: float = 5.0,
    base_radius: int = 45,
    base_eps: float = 0.3,
    detail_radius: int = 7,
    detail_eps: float = 1e-6,
) -> ArrayLike:
    """Guided filtering fusion, GFF (Li, Kang & Hu, "Image Fusion With Guided Filtering", IEEE TIP 22(7), 2013).

    Per source ``I_n``: a two-scale split into the base ``B_n = box_{base_size}(I_n)`` and the detail
    ``D_n = I_n - B_n``; the saliency ``S_n = gauss(|laplace(I_n)|)`` (Gaussian of ``saliency_sigma``, cut at
    ``saliency_radius``); the binary map ``P_n = [S_n is the largest]`` (ties go to the MRI); its weights refined by
    guided filtering with the source as guide, ``W_n^B = G_{base_radius, base_eps}(P_n, I_n)`` and
    ``W_n^D = G_{detail_radius, detail_eps}(P_n, I_n)``, normalised to sum to 1 per voxel; and
    ``F = sum_n W_n^B B_n + sum_n W_n^D D_n``. The defaults are the paper's (for 2D images in [0, 1], in pixels);
    here they are used unchanged, in voxels, with the n-D Laplacian and box filters, so a 3D volume is fused in 3D.

    Args:
        mri, pet: same shape, e.g. ``(D, H, W)`` or ``(B, 1, D, H, W)``, intensities in [0, 1].
        base_size: edge of the mean filter of the two-scale split (default 31).
        saliency_radius, saliency_sigma: Gaussian smoothing of the Laplacian magnitude (defaults 5 and 5).
        base_radius, base_eps: guided filter of the base weights (defaults 45 and 0.3).
        detail_radius, detail_eps: guided filter of the detail weights (defaults 7 and 1e-6).
    """
    for name, value in (("base_size", base_size), ("base_radius", base_radius), ("detail_radius", detail_radius)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if saliency_radius < 0 or saliency_sigma <= 0 or base_eps <= 0 or detail_eps <= 0:
        raise ValueError("saliency_radius must be >= 0 and saliency_sigma, base_eps, detail_eps positive.")

    def saliency(x: np.ndarray) -> np.ndarray:
        lap = np.abs(ndimage.laplace(x, mode="nearest"))
        return ndimage.gaussian_filter(lap, saliency_sigma, mode="nearest", truncate=saliency_radius / saliency_sigma)

    def weights(p_mri: np.ndarray, a: np.ndarray, b: np.ndarray, radius: int, eps: float) -> np.ndarray:
        w_a, w_b = guided_filter(a, p_mri, radius, eps), guided_filter(b, 1.0 - p_mri, radius, eps)
        total = w_a + w_b
        return np.where(total == 0, 0.5, w_a / np.where(total == 0, 1.0, total))  # the MRI's share

    def fuse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        base_a = ndimage.uniform_filter(a, size=base_size, mode="nearest")
        base_b = ndimage.uniform_filter(b, size=base_size, mode="nearest")
        p_mri = (saliency(a) >= saliency(b)).astype(np.float64)
        w_base = weights(p_mri, a, b, base_radius, base_eps)
        w_detail = weights(p_mri, a, b, detail_radius, detail_eps)
        base = w_base * base_a + (1 - w_base) * base_b
        detail = w_detail * (a - base_a) + (1 - w_detail) * (b - base_b)
        return base + detail

    return _fuse_spatial(mri, pet, fuse)


#: the classical fusion baselines by name: ``fn(mri, pet) -> fused`` (numpy or torch in, the same out)
BASELINES: dict[str, Callable[[ArrayLike, ArrayLike], ArrayLike]] = {
    "average": average_fusion,
    "maximum": maximum_fusion,
    "laplacian_pyramid": laplacian_pyramid_fusion,
    "guided_filter": guided_filter_fusion,
}
