"""Lesion segmentation metrics per volume and per slice, counted inside the lung: Dice, sensitivity, specificity.

The COVID-19 pipeline (Shabani et al., Computers in Biology and Medicine 2022; El Fahsi et al.) reports Dice,
sensitivity and specificity per slice and per volume, and their relation to the infected fraction of the lung.
The public code looped over pixels and took a maximum, which made its numbers meaningless; here each number is
a ratio of voxel counts of one volume (or one slice):

    TP = |P & L|,  FP = |P & ~L & R|,  FN = |~P & L|,  TN = |~P & ~L & R|
    Dice = 2 TP / (2 TP + FP + FN),  sensitivity = TP / (TP + FN),  specificity = TN / (TN + FP)

with ``P`` the prediction, ``L`` the reference lesion mask and ``R`` the region the metric is counted in:
``R = lung | L`` (the lung mask, plus every reference lesion voxel, so that a lesion the lung mask missed still
counts as a false negative). Specificity is counted inside ``R`` because outside the lungs the pipeline
predicts nothing by construction: over the whole scan every method would score > 0.99. Predictions outside
``R`` count as false positives too (they are not silently dropped). A ratio with a zero denominator is NaN
(e.g. the Dice and sensitivity of a slice without lesion and without prediction), and NaNs are left out of
means. The lesion fraction of the lung is ``|L| / |R|``.

MONAI's ``get_confusion_matrix`` counts over the whole image, with no region of interest, which is why the
counts are written here; the formulas are MONAI's (``compute_confusion_matrix_metric``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.utils import convert_to_numpy

__all__ = ["METRIC_NAMES", "confusion_counts", "lesion_metrics", "metrics_from_counts", "nanmean_metrics"]

#: metric names, in the order they appear in tables.
METRIC_NAMES: tuple[str, ...] = ("dice", "sensitivity", "specificity")


def _as_bool(a: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = convert_to_numpy(a.detach() if isinstance(a, torch.Tensor) else a, wrap_sequence=True)
    return np.asarray(arr) > 0.5 if arr.dtype != bool else np.asarray(arr)


def confusion_counts(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    lung: np.ndarray | torch.Tensor,
    slice_axis: int | None = None,
) -> dict[str, np.ndarray]:
    """Voxel counts TP, FP, FN, TN inside ``R = lung | label``, for the volume or per slice.

    Args:
        pred: binary prediction (values > 0.5 are lesion), any shape, e.g. ``(X, Y, Z)``.
        label: reference lesion mask, same shape.
        lung: lung mask, same shape.
        slice_axis: ``None`` for one count per volume (0-d arrays), or the axis of the slices (e.g. 2 for
            ``(X, Y, Z)`` NIfTI order) for one count per slice (``(n_slices,)`` arrays).

    Returns:
        dict with int64 arrays ``tp``, ``fp``, ``fn``, ``tn``, ``lesion`` (``|L|``) and ``region`` (``|R|``).
    """
    p, lab, lu = _as_bool(pred), _as_bool(label), _as_bool(lung)
    if not p.shape == lab.shape == lu.shape:
        raise ValueError(f"pred {p.shape}, label {lab.shape} and lung {lu.shape} must have the same shape")
    region = lu | lab
    if slice_axis is None:
        axes: tuple[int, ...] | None = None
    else:
        if not -p.ndim <= slice_axis < p.ndim:
            raise ValueError(f"slice_axis {slice_axis} is out of range for {p.ndim}D arrays")
        axes = tuple(a for a in range(p.ndim) if a != slice_axis % p.ndim)

    def count(x: np.ndarray) -> np.ndarray:
        return np.asarray(x.sum(axis=axes), dtype=np.int64)

    return {
        "tp": count(p & lab),
        "fp": count(p & ~lab),
        "fn": count(~p & lab),
        "tn": count(~p & ~lab & region),
        "lesion": count(lab),
        "region": count(region),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def metrics_from_counts(counts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dice, sensitivity, specificity and lesion fraction from :func:`confusion_counts` (NaN for 0 / 0)."""
    tp, fp, fn, tn = (np.asarray(counts[k]) for k in ("tp", "fp", "fn", "tn"))
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "lesion_fraction": _ratio(counts["lesion"], counts["region"]),
    }


def lesion_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    lung: np.ndarray | torch.Tensor,
    slice_axis: int = 2,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per-volume and per-slice metrics of one case.

    Args:
        pred, label, lung: binary volumes of one shape (``(X, Y, Z)`` as NIfTI stores them, by default).
        slice_axis: the axial axis. Default 2 (NIfTI ``(X, Y, Z)``).

    Returns:
        ``(volume, slices)``: ``volume`` maps ``dice``, ``sensitivity``, ``specificity``, ``lesion_fraction``
        to floats (NaN where undefined); ``slices`` maps the same names plus ``slice`` (index) to arrays over
        the slices that hold lung or lesion (slices outside the region carry no information).
    """
    vol = {k: float(v) for k, v in metrics_from_counts(confusion_counts(pred, label, lung)).items()}
    counts = confusion_counts(pred, label, lung, slice_axis=slice_axis)
    keep = np.flatnonzero(counts["region"] > 0)
    per_slice = {k: v[keep] for k, v in metrics_from_counts(counts).items()}
    per_slice["slice"] = keep.astype(np.int64)
    return vol, per_slice


def nanmean_metrics(rows: list[Mapping[str, float]], names: tuple[str, ...] = METRIC_NAMES) -> dict[str, float | None]:
    """Mean of each metric over ``rows`` ignoring NaN; ``None`` where no row has a finite value."""
    out: dict[str, float | None] = {}
    for name in names:
        values = np.asarray([r[name] for r in rows if name in r], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[name] = float(finite.mean()) if finite.size else None
    return out
