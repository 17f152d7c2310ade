"""Pseudo-lesion masks from the 3D inpainting GAN, and the slice classes of the contrastive phase.

Shabani et al., "Self-supervised region-aware segmentation of COVID-19 CT images using 3D GAN and
contrastive learning", Computers in Biology and Medicine 2022: the generator turns a COVID-19 volume
into a synthetic healthy one; what it removed, ``input - G(input)`` (both min-max normalised), inside the
lungs and thresholded, is the pseudo-lesion mask. Axial slices are then labelled by their pseudo-lesion
burden ("high" above the upper quartile, "low" between the quartiles) for the supervised contrastive
terms of the TransUNet (:mod:`common.losses.contrastive`).

Volumes are ``(Z, Y, X)`` (axial slices along axis 0), as produced by :mod:`common.data.chest_ct`.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.utils import convert_to_numpy
from skimage.filters import threshold_otsu

__all__ = ["pseudo_mask", "residual_map", "slice_burden", "slice_classes"]


def _as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return convert_to_numpy(a.detach() if isinstance(a, torch.Tensor) else a, wrap_sequence=True)


def _minmax_in(values: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Scale ``values`` to [0, 1] with the minimum and maximum taken inside the lung."""
    inside = values[lung]
    lo, hi = float(inside.min()), float(inside.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def residual_map(
    inputs: np.ndarray | torch.Tensor, generated: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor
) -> np.ndarray:
    """What the generator removed: ``max(norm(inputs) - norm(generated), 0)`` inside the lung, 0 outside.

    ``norm`` is min-max scaling to [0, 1] with the extremes taken inside the lung (so the zeroed
    background of a lung-masked volume does not set the minimum). Only the positive part is kept:
    lesions are denser than the parenchyma that replaces them. Any equal shapes, float32 out.
    """
    x, g, m = _as_numpy(inputs).astype(np.float32), _as_numpy(generated).astype(np.float32), _as_numpy(lung) > 0
    if not x.shape == g.shape == m.shape:
        raise ValueError(f"inputs {x.shape}, generated {g.shape} and lung {m.shape} must have the same shape")
    if not m.any():
        raise ValueError("the lung mask is empty")
    if not (np.isfinite(x[m]).all() and np.isfinite(g[m]).all()):
        raise ValueError("inputs or generated contain NaN or infinite values inside the lung")
    residual = np.clip(_minmax_in(x, m) - _minmax_in(g, m), 0.0, None)
    return np.where(m, residual, 0.0).astype(np.float32)


def pseudo_mask(
    inputs: np.ndarray | torch.Tensor,
    generated: np.ndarray | torch.Tensor,
    lung: np.ndarray | torch.Tensor,
    threshold: float | str = 0.1,
) -> np.ndarray:
    """Pseudo-lesion mask ``residual_map(inputs, generated, lung) > t``, bool, same shape as ``inputs``.

    Threshold rule (``threshold``):

    - a number ``t`` (default 0.1): fixed, on the normalised residual. With the [-1000, 400] HU window,
      lung air at 0 and vessels near the top of the scale, 0.1 of the normalised range is about 140 HU
      of removed density: ground glass (about -700 to -300 HU) and consolidation pass, noise does not;
    - ``"otsu"``: Otsu's threshold on the positive residuals inside the lung, adapted per volume, for
      generators whose residual scale differs; it always splits something, so it is meant for volumes
      known to hold lesions.

    A residual of exactly 0 is never a lesion, so a generator that changes nothing (``G(x) = x``) gives an
    empty mask under both rules.

    Args:
        inputs: the (COVID) volume fed to the generator, e.g. ``(Z, Y, X)``.
        generated: ``G(inputs)``, same shape.
        lung: lung mask, same shape.
        threshold: number in [0, 1) or ``"otsu"``.
    """
    residual = residual_map(inputs, generated, lung)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
        positive = residual[residual > 0]
        if positive.size < 2 or positive.min() == positive.max():
            return residual > 0
        t = float(threshold_otsu(positive))
    else:
        t = float(threshold)
        if not 0.0 <= t < 1.0:
            raise ValueError(f"a numeric threshold must be in [0, 1), got {threshold}")
    return residual > t


def slice_burden(mask: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, axis: int = 0) -> np.ndarray:
    """Pseudo-lesion burden per axial slice: lesion voxels inside the lung / lung voxels, ``-> (n_slices,)``.

    Slices without lung get NaN (they carry no information and are excluded by :func:`slice_classes`).
    ``axis`` is the slice axis (0 for ``(Z, Y, X)`` volumes).
    """
    m, lu = _as_numpy(mask) > 0, _as_numpy(lung) > 0
    if m.shape != lu.shape:
        raise ValueError(f"mask {m.shape} and lung {lu.shape} must have the same shape")
    other = tuple(a for a in range(m.ndim) if a != axis % m.ndim)
    lung_count = lu.sum(axis=other).astype(np.float64)
    lesion_count = (m & lu).sum(axis=other).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lung_count > 0, lesion_count / lung_count, np.nan)


def slice_classes(
    burden: np.ndarray | torch.Tensor, seed: int = 0, balance: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Label slices "high" (1) or "low" (0) by pseudo-lesion burden, balanced by subsampling.

    With ``q1, q3`` the 25th and 75th percentiles of the finite burdens: "high" is ``burden > q3``, "low"
    is ``q1 <= burden <= q3``; slices below ``q1`` and NaN slices (no lung) are left out. With
    ``balance`` the larger class is subsampled without replacement (``numpy.random.default_rng(seed)``)
    to the size of the smaller one. Pass the burdens of many volumes concatenated to get dataset-wide
    quartiles; the returned indices then index that concatenation.

    Returns:
        ``(indices, labels)``: int64 arrays, indices sorted ascending, labels 1 = high, 0 = low. Both are
        empty when one class is empty (e.g. all burdens equal): such a set cannot feed a contrastive loss.
    """
    b = _as_numpy(burden).astype(np.float64).reshape(-1)
    valid = np.isfinite(b)
    empty = np.zeros(0, dtype=np.int64)
    if valid.sum() == 0:
        return empty, empty
    q1, q3 = np.percentile(b[valid], [25, 75])
    high = np.flatnonzero(valid & (b > q3))
    low = np.flatnonzero(valid & (b >= q1) & (b <= q3))
    if high.size == 0 or low.size == 0:
        return empty, empty
    if balance:
        rng = np.random.default_rng(seed)
        n = min(high.size, low.size)
        high = np.sort(rng.choice(high, n, replace=False))
        low = np.sort(rng.choice(low, n, replace=False))
    indices = np.concatenate([high, low])
    labels = np.concatenate([np.ones(high.size, dtype=np.int64), np.zeros(low.size, dtype=np.int64)])
    order = np.argsort(indices, kind="stable")
    return indices[order].astype(np.int64), labels[order]
