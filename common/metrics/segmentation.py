"""Segmentation metrics as the field reports them: HD95 and NSD in millimetres, and BraTS 2023 lesion-wise scores.

All distances are in millimetres, from the spacing of the grid the two masks are on (``spacing``: one value per
spatial axis, read from the affine of the reference's MetaTensor by :func:`grid_spacing`). For one region, with ``P``
the binary prediction and ``G`` the binary reference:

- **Dice** ``2 |P & G| / (|P| + |G|)``. The evaluate configs use MONAI's ``DiceMetric(ignore_empty=False)``, which
  is this with the empty cases below; :func:`dice` is the same formula, for the lesion-wise scores.
- **HD95**, MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``: the surface of a mask is the mask
  minus its erosion by the 6-neighbourhood (voxel centres); for every surface voxel of one mask, the Euclidean
  distance in mm to the nearest surface voxel of the other; the 95th percentile (linear interpolation) of each of
  the two directed sets; HD95 is the **larger of the two directed percentiles**. medpy's directed surface
  distances with the same percentile give the same number (tested to 0.01 mm); medpy's own ``hd95`` instead takes
  the percentile of both directions pooled, and DeepMind's ``surface-distance`` (which the BraTS 2023 evaluation
  calls) places surface elements at voxel corners and weights them by area. On the split mask of the tests (0.7 x
  0.7 x 5 mm) this HD95 is 18.25 mm, medpy's pooled one 13.08 mm and surface-distance's 17.05 mm; on smooth
  shapes all three agree to a fraction of a voxel.
- **NSD** at tolerance ``tau`` mm (normalised surface Dice, Nikolov et al., arXiv:1809.04430): the share of both
  surfaces, by area, that lies within ``tau`` of the other surface. MONAI's
  ``compute_surface_dice(use_subvoxels=True)``, DeepMind's surface elements and areas (tested against
  ``surface-distance`` to 1e-4).

Empty masks are scored as BraTS 2023 scores them: both empty gives Dice 1 and HD95 0; one empty gives Dice 0 and
HD95 = ``penalty_mm``, BraTS's 374 mm (the diagonal of its 240 x 240 x 155 mm field of view, rounded up). NSD,
which BraTS does not report, follows suit: 1 when both are empty, 0 when one is.

**Lesion-wise scores** after the BraTS 2023 convention (Saluja et al., "BraTS 2023 lesion-wise performance
metrics", github.com/rachitsaluja/BraTS-2023-Metrics), per region:

1. reference lesions: the connected components (26-connectivity) of ``G`` dilated ``dilation`` times by the
   18-neighbourhood, restricted to ``G``, so components of ``G`` closer than the dilation count as one lesion
   (BraTS uses 3 dilations for GLI, SSA and PED, 1 for MEN and MET);
2. predicted lesions: the connected components (26-connectivity) of ``P``;
3. each reference lesion ``L`` is matched to every predicted lesion that touches ``L`` dilated ``dilation`` times,
   and scores the Dice and HD95 of ``L`` against the union of its matches (0 and ``penalty_mm`` if it has none:
   a missed lesion);
4. each predicted lesion matched to no reference lesion is a false positive and scores 0 and ``penalty_mm``;
5. reference lesions of ``min_lesion_volume_mm3`` or less (BraTS 2023: 50 mm^3, 2 mm^3 for MET) are left out of
   the scores; the predicted lesions they match are not false positives;
6. lesion-wise Dice = (sum of the kept lesions' Dice) / (kept + FP), lesion-wise HD95 = (sum of their HD95 +
   FP x ``penalty_mm``) / (kept + FP); with neither a kept lesion nor a false positive, Dice 1 and HD95 0.

Where this differs from the BraTS 2023 code: each HD95 (volume-wise and per lesion) is MONAI's voxel-surface HD95
above, not ``surface-distance``'s area-weighted one (the difference is a fraction of a voxel on smooth lesions);
everything else (dilation element and count, connectivity, matching, volume threshold, penalty, empty cases)
follows it. scipy's ``ndimage.label`` and ``binary_dilation`` do the components and dilations (MONAI has no
connected-component labelling of all components), MONAI's functions the distances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import CumulativeIterationMetric, compute_hausdorff_distance, compute_surface_dice
from monai.utils import convert_to_numpy
from scipy import ndimage

__all__ = [
    "BRATS_DILATION",
    "BRATS_MIN_LESION_MM3",
    "BRATS_PENALTY_MM",
    "METRIC_NAMES",
    "LesionWiseScores",
    "SegmentationMetrics",
    "dice",
    "grid_spacing",
    "hd95",
    "lesion_wise",
    "reference_lesions",
    "surface_dice",
]

#: BraTS 2023's distance for a missed or false-positive lesion and for a volume with one mask empty (mm).
BRATS_PENALTY_MM = 374.0
#: BraTS 2023's dilations of the reference for BraTS-GLI, SSA and PED (MEN and MET use 1).
BRATS_DILATION = 3
#: BraTS 2023's volume threshold (mm^3): reference lesions this small or smaller are not scored (GLI, SSA, MEN, PED).
BRATS_MIN_LESION_MM3 = 50.0

#: per case and region, in this order, what :class:`SegmentationMetrics` computes.
METRIC_NAMES: tuple[str, ...] = (
    "hd95_mm",
    "nsd",
    "lesion_dice",
    "lesion_hd95_mm",
    "lesions_tp",
    "lesions_fn",
    "lesions_fp",
)


def _mask(x: Any) -> np.ndarray:
    arr = np.asarray(convert_to_numpy(x.detach() if isinstance(x, torch.Tensor) else x, wrap_sequence=True))
    return arr if arr.dtype == bool else arr > 0.5


def _spacing(spacing: Sequence[float], ndim: int) -> list[float]:
    values = [float(s) for s in np.ravel(spacing)]
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {spacing}")
    return values


def _pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _mask(pred), _mask(ref)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and reference {g.shape} must be on one grid")
    return p, g


def _dilate(mask: np.ndarray, times: int) -> np.ndarray:
    # BraTS 2023's element (the 18-neighbourhood in 3D); scipy reads iterations=0 as "until nothing changes"
    return (
        ndimage.binary_dilation(mask, ndimage.generate_binary_structure(mask.ndim, 2), iterations=times)
        if times
        else mask
    )


def grid_spacing(x: Any, spatial_dims: int) -> np.ndarray:
    """Voxel spacing (mm) of a MetaTensor from its affine: ``(spatial_dims,)``, or ``(B, spatial_dims)`` if batched.

    Raises ``ValueError`` naming the file when ``x`` carries no affine (a plain tensor): distances are never
    silently computed in voxels.
    """
    if not isinstance(x, MetaTensor):
        raise ValueError(
            f"the reference is a {type(x).__name__} without an affine, so its voxel spacing is unknown: "
            "pass MetaTensors (e.g. from LoadImaged) or give the spacing in mm explicitly"
        )
    affine = np.asarray(convert_to_numpy(x.affine), dtype=np.float64)
    if affine.ndim == 3:
        return np.stack([affine_to_spacing(a, r=spatial_dims) for a in affine])
    return np.asarray(affine_to_spacing(affine, r=spatial_dims), dtype=np.float64)


def dice(pred: Any, ref: Any) -> float:
    """``2 |P & G| / (|P| + |G|)`` of two binary masks of one shape; 1 when both are empty (BraTS)."""
    p, g = _pair(pred, ref)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total


def _as_batch(p: np.ndarray, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(p[None, None]), torch.as_tensor(g[None, None])


def hd95(pred: Any, ref: Any, spacing: Sequence[float], penalty_mm: float = BRATS_PENALTY_MM) -> float:
    """HD95 in mm (max of the two directed 95th percentiles, MONAI's definition; see the module docstring).

    Args:
        pred, ref: binary masks of one shape, e.g. ``(X, Y, Z)`` (values > 0.5 are foreground).
        spacing: voxel spacing in mm, one value per axis.
        penalty_mm: the value when exactly one mask is empty (BraTS: 374). Both empty: 0.
    """
    p, g = _pair(pred, ref)
    sp = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        return 0.0 if not (p.any() or g.any()) else float(penalty_mm)
    return float(compute_hausdorff_distance(*_as_batch(p, g), include_background=True, percentile=95, spacing=sp))


def surface_dice(pred: Any, ref: Any, spacing: Sequence[float], tolerance_mm: float) -> float:
    """NSD at ``tolerance_mm`` (MONAI, DeepMind's surface elements); 1 when both masks are empty, 0 when one is."""
    p, g = _pair(pred, ref)
    sp = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        return 1.0 if not (p.any() or g.any()) else 0.0
    nsd = compute_surface_dice(
        *_as_batch(p, g), [float(tolerance_mm)], include_background=True, spacing=sp, use_subvoxels=True
    )
    return float(nsd)


def reference_lesions(ref: Any, dilation: int = BRATS_DILATION) -> tuple[np.ndarray, int]:
    """Lesions of a reference mask, BraTS 2023 style: ``(labels, n)``, labels ``1..n`` on the reference, 0 elsewhere.

    Connected components (26-connectivity in 3D) of the reference dilated ``dilation`` times by the
    18-neighbourhood, restricted to the reference: components closer than the dilation are one lesion.
    """
    g = _mask(ref)
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    labels, n = ndimage.label(_dilate(g, dilation), structure=ndimage.generate_binary_structure(g.ndim, g.ndim))
    return np.where(g, labels, 0), int(n)


@dataclass(frozen=True)
class LesionWiseScores:
    """Lesion-wise Dice and HD95 (mm) of one region and the lesion counts behind them (see the module docstring)."""

    dice: float
    hd95_mm: float
    tp: int  #: scored reference lesions with a match
    fn: int  #: scored reference lesions without one
    fp: int  #: predicted lesions matching no reference lesion


def _box(slices: Sequence[slice], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(slices, shape))


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def lesion_wise(
    pred: Any,
    ref: Any,
    spacing: Sequence[float],
    dilation: int = BRATS_DILATION,
    min_lesion_volume_mm3: float = BRATS_MIN_LESION_MM3,
    penalty_mm: float = BRATS_PENALTY_MM,
) -> LesionWiseScores:
    """BraTS 2023 lesion-wise Dice and HD95 of one region (steps 1-6 of the module docstring).

    Args:
        pred, ref: binary masks of one shape, e.g. ``(X, Y, Z)``.
        spacing: voxel spacing in mm, one value per axis (lesion volumes and distances).
        dilation: dilations of the reference for merging and matching (BraTS-GLI: 3).
        min_lesion_volume_mm3: reference lesions of this volume or less are not scored (BraTS-GLI: 50).
        penalty_mm: HD95 of a missed or false-positive lesion (BraTS: 374).
    """
    p, g = _pair(pred, ref)
    sp = _spacing(spacing, p.ndim)
    voxel_mm3 = float(np.prod(sp))
    ref_labels, n_ref = reference_lesions(g, dilation)
    pred_labels, n_pred = ndimage.label(p, structure=ndimage.generate_binary_structure(p.ndim, p.ndim))
    pred_boxes = ndimage.find_objects(pred_labels)
    matched: set[int] = set()
    dices: list[float] = []
    distances: list[float] = []
    tp = fn = 0
    for k, lesion_box in enumerate(ndimage.find_objects(ref_labels, max_label=n_ref), start=1):
        # the dilation reaches `dilation` voxels: cropping to the lesion's box plus that margin is exact
        zone_box = _box(lesion_box, dilation, p.shape)
        lesion = ref_labels[zone_box] == k
        zone = _dilate(lesion, dilation)
        hits = np.unique(pred_labels[zone_box][zone])
        hits = [int(h) for h in hits if h > 0]
        matched.update(hits)
        if lesion.sum() * voxel_mm3 <= min_lesion_volume_mm3:
            continue
        box = lesion_box
        for h in hits:
            box = _union(box, pred_boxes[h - 1])
        found = np.isin(pred_labels[box], hits)
        this = ref_labels[box] == k
        dices.append(dice(found, this))
        distances.append(hd95(found, this, sp, penalty_mm))
        tp, fn = (tp + 1, fn) if hits else (tp, fn + 1)
    fp = n_pred - len(matched)
    count = len(dices) + fp
    if count == 0:
        return LesionWiseScores(1.0, 0.0, tp, fn, fp)
    return LesionWiseScores(sum(dices) / count, (sum(distances) + fp * penalty_mm) / count, tp, fn, fp)


class SegmentationMetrics(CumulativeIterationMetric):
    """Per case and region: HD95 (mm), NSD, BraTS 2023 lesion-wise Dice and HD95 (mm), and the lesion counts.

    A MONAI cumulative metric, so MONAI's ``IgniteMetricHandler`` (or
    :class:`common.engines.handlers.SegmentationMetricsHandler`, which files every metric separately) drives it
    from an evaluator. Each call takes binary ``y_pred`` and ``y`` of shape ``(B, C, *spatial)`` (or lists of
    ``(C, *spatial)``, as ``from_engine`` gives) and buffers a ``(B, C, len(METRIC_NAMES))`` table, columns in the
    order of :data:`METRIC_NAMES`. The spacing is the grid's: read from the affine of ``y`` (a MetaTensor) unless
    ``spacing=`` is passed to the call; a plain tensor without it is an error, never a distance in voxels.
    Definitions, empty cases and the BraTS 2023 convention: the module docstring.

    Args:
        nsd_tolerance_mm: NSD tolerance in mm, one for all regions or one per channel. Default 1 mm (one voxel of
            the 1 mm BraTS grid; BraTS itself reports no NSD).
        dilation: lesion merging and matching dilations. Default 3 (BraTS-GLI).
        min_lesion_volume_mm3: smallest scored reference lesion is above this. Default 50 (BraTS-GLI).
        penalty_mm: distance of a missed / false-positive lesion or of a volume with one mask empty. Default 374.
    """

    def __init__(
        self,
        nsd_tolerance_mm: float | Sequence[float] = 1.0,
        dilation: int = BRATS_DILATION,
        min_lesion_volume_mm3: float = BRATS_MIN_LESION_MM3,
        penalty_mm: float = BRATS_PENALTY_MM,
    ) -> None:
        super().__init__()
        self.nsd_tolerance_mm = [float(t) for t in np.ravel(nsd_tolerance_mm)]
        if not self.nsd_tolerance_mm or any(not np.isfinite(t) or t < 0 for t in self.nsd_tolerance_mm):
            raise ValueError(f"nsd_tolerance_mm must be finite and >= 0, got {nsd_tolerance_mm}")
        if dilation < 0:
            raise ValueError(f"dilation must be >= 0, got {dilation}")
        self.dilation = int(dilation)
        self.min_lesion_volume_mm3 = float(min_lesion_volume_mm3)
        self.penalty_mm = float(penalty_mm)

    def _tolerance(self, channels: int) -> list[float]:
        if len(self.nsd_tolerance_mm) == 1:
            return self.nsd_tolerance_mm * channels
        if len(self.nsd_tolerance_mm) != channels:
            raise ValueError(f"{len(self.nsd_tolerance_mm)} NSD tolerances for {channels} channels")
        return self.nsd_tolerance_mm

    def region_metrics(
        self, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float
    ) -> list[float]:
        """The :data:`METRIC_NAMES` values of one region of one case."""
        lw = lesion_wise(pred, ref, spacing, self.dilation, self.min_lesion_volume_mm3, self.penalty_mm)
        return [
            hd95(pred, ref, spacing, self.penalty_mm),
            surface_dice(pred, ref, spacing, tolerance_mm),
            lw.dice,
            lw.hd95_mm,
            float(lw.tp),
            float(lw.fn),
            float(lw.fp),
        ]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape or y.ndim < 3:
            raise ValueError(f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} must both be (B, C, *spatial)")
        batch, channels, spatial_dims = y.shape[0], y.shape[1], y.ndim - 2
        given = kwargs.get("spacing")
        spacing = np.asarray(given, dtype=np.float64) if given is not None else grid_spacing(y, spatial_dims)
        spacing = np.broadcast_to(spacing, (batch, spatial_dims))
        pred, ref = _mask(y_pred), _mask(y)
        tolerance = self._tolerance(channels)
        table = [
            [self.region_metrics(pred[b, c], ref[b, c], spacing[b], tolerance[c]) for c in range(channels)]
            for b in range(batch)
        ]
        return torch.as_tensor(table, dtype=torch.float64, device=y.device)

    def aggregate(self) -> dict[str, float]:  # type: ignore[override]
        """Mean of each metric over cases and regions (nothing is NaN under the BraTS conventions)."""
        table = self.get_buffer()
        if not isinstance(table, torch.Tensor) or table.numel() == 0:
            raise ValueError("SegmentationMetrics.aggregate: no case was computed")
        means = table.reshape(-1, len(METRIC_NAMES)).double().mean(dim=0)
        return {name: float(v) for name, v in zip(METRIC_NAMES, means)}
