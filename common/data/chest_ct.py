"""Chest CT preprocessing for the COVID-19 lesion pipeline (3D GAN pseudo-masks + TransUNet).

Shabani et al., "Self-supervised region-aware segmentation of COVID-19 CT images using 3D GAN and
contrastive learning", Computers in Biology and Medicine 2022: HU clipped to [-1000, 400] and scaled to
[0, 1]; voxels outside the lungs set to 0; crop to the lung bounding box; resample to 32 x 128 x 128.

Axis convention (read this once): every array function here works on volumes in **(z, y, x)** order,
i.e. ``(slices, rows, columns)``, with ``spacing`` in millimetres in the same order. nibabel (and
:func:`common.data.nifti.load_nifti`) returns NIfTI arrays in voxel order **(x, y, z)**, so convert with
``np.transpose(array_xyz, (2, 1, 0))`` and ``spacing_zyx = header.get_zooms()[:3][::-1]``
(:func:`nifti_to_zyx` does both). The third NIfTI voxel axis is assumed to be the axial slice axis, as
in MosMedData; reorient first (``monai.transforms.Orientationd``) for volumes stored otherwise.
The MONAI transforms :class:`LungPreprocessd` / its inverse take MONAI's channel-first layout
``(1, X, Y, Z)`` (what ``LoadImaged`` + ``EnsureChannelFirstd`` give for NIfTI) and produce
``(1, Z, Y, X)`` grids with an affine that still maps every grid voxel to its world position.

The lung mask is classical (no weights), see :func:`lung_mask`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import InvertibleTransform, MapTransform, Resize
from monai.utils import TraceKeys, convert_to_numpy
from scipy import ndimage

from common.errors import DataError

__all__ = [
    "LungPreprocessd",
    "LungRestored",
    "hu_window",
    "lung_bounding_box",
    "lung_mask",
    "nifti_to_zyx",
    "preprocess_ct",
    "resample_to_grid",
    "restore_to_original",
]

#: smallest accepted CT, (z, y, x) voxels: fewer slices or a smaller matrix is not a chest CT volume.
MIN_CT_SHAPE: tuple[int, int, int] = (3, 32, 32)

_INFO_KEYS = ("box", "original_shape", "grid")


def nifti_to_zyx(array_xyz: np.ndarray, zooms_xyz: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Turn a nibabel array ``(X, Y, Z)`` and its voxel sizes into the ``(Z, Y, X)`` layout used here.

    Returns:
        ``(array_zyx, spacing_zyx)``; the array is a transposed view, no copy.
    """
    array_xyz = np.asarray(array_xyz)
    if array_xyz.ndim != 3 or len(zooms_xyz) < 3:
        raise ValueError(f"expected a 3D (X, Y, Z) array and 3 voxel sizes, got shape {array_xyz.shape}")
    sx, sy, sz = (float(s) for s in zooms_xyz[:3])
    return np.transpose(array_xyz, (2, 1, 0)), (sz, sy, sx)


def hu_window(ct: np.ndarray | torch.Tensor, lo: float = -1000.0, hi: float = 400.0) -> np.ndarray | torch.Tensor:
    """Clip Hounsfield units to ``[lo, hi]`` and scale linearly to ``[0, 1]`` (``lo -> 0``, ``hi -> 1``).

    Any shape; returns the same array type (float32 for NumPy input).
    """
    if not hi > lo:
        raise ValueError(f"the window needs hi > lo, got lo={lo}, hi={hi}")
    if isinstance(ct, torch.Tensor):
        return ((ct.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((np.asarray(ct, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _check_ct(ct_hu: np.ndarray, spacing: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (z, y, x) HU volume and its spacing; return them as float32 / float64 arrays."""
    ct = np.asarray(ct_hu)
    if ct.ndim != 3:
        raise DataError(name, f"expected a 3D (z, y, x) CT volume, got shape {tuple(ct.shape)}")
    if any(s < m for s, m in zip(ct.shape, MIN_CT_SHAPE)):
        raise DataError(name, f"CT volume too small: shape {tuple(ct.shape)}, need at least {MIN_CT_SHAPE} (z, y, x)")
    ct = ct.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(ct)))
    if bad:
        raise DataError(name, f"CT volume contains {bad} NaN or infinite values")
    lo, hi = float(ct.min()), float(ct.max())
    if hi - lo < 1e-6:
        raise DataError(name, f"CT volume is constant (all voxels {lo:g}): empty or not a CT")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise DataError(name, f"voxel spacing must be 3 positive numbers (z, y, x) in mm, got {tuple(spacing)}")
    return ct, sp


def _ball_closing(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Binary closing by a ball of ``radius_mm`` in millimetres, exact for anisotropic voxels.

    Uses two Euclidean distance transforms (dilation = distance to the set <= r, erosion of the result =
    distance to its complement > r): linear time, whereas ``ndimage.binary_closing`` with a 20 mm ball
    on 0.7 mm voxels would slide a 60^3 structuring element. The volume is padded by the radius first
    so that the erosion does not eat the set where it touches the volume border.
    """
    pad = [int(math.ceil(radius_mm / s)) + 1 for s in spacing]
    padded = np.pad(mask, [(p, p) for p in pad])
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    return closed[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape))]


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial (z) slice separately."""
    out = np.empty_like(mask)
    for z in range(mask.shape[0]):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def _remove_mediastinal_airways(
    mask: np.ndarray, spacing: np.ndarray, x_mid: float, max_area_mm2: float, midline_mm: float
) -> np.ndarray:
    """Drop, slice by slice, the small air regions of ``mask`` near the midline: trachea and main bronchi.

    The airways are air, and through the bronchi they join both lungs into one 3D component; in an axial slice the
    trachea and the extrapulmonary bronchi are separate small round regions by the midline (a 25 mm trachea is
    490 mm^2), while the lungs' cross-sections are large or lateral. A 2D component (8-connected) is dropped when
    its area is below ``max_area_mm2`` and its centroid within ``midline_mm`` of the midline column ``x_mid``.
    """
    out = mask.copy()
    pixel_mm2 = float(spacing[1] * spacing[2])
    for z in range(mask.shape[0]):
        labels, n = ndimage.label(mask[z], structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:] * pixel_mm2
        columns = ndimage.mean(np.broadcast_to(np.arange(mask.shape[2]), mask.shape[1:]), labels, np.arange(1, n + 1))
        small_midline = (areas < max_area_mm2) & (np.abs(np.asarray(columns) - x_mid) * spacing[2] < midline_mm)
        if small_midline.any():
            out[z][np.isin(labels, np.flatnonzero(small_midline) + 1)] = False
    return out


def _split_lungs(mask: np.ndarray, x_mid: float) -> list[tuple[np.ndarray, float]]:
    """The lungs of ``mask`` as ``[(lung, side)]``, side ``-1`` for columns below ``x_mid``, ``+1`` above.

    Each 3D component goes to the side of its centroid, except a component with at least 10 % of its voxels on
    either side of the midline (lungs joined at the anterior junction), whose voxels are split at ``x_mid``.
    """
    labels, n = ndimage.label(mask)
    columns = np.arange(mask.shape[2])[None, None, :]
    sides = {-1.0: np.zeros_like(mask), 1.0: np.zeros_like(mask)}
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[box] == lab
        right = component & (columns[..., box[2]] >= x_mid)
        share = right.sum() / component.sum()
        if 0.1 <= share <= 0.9:
            sides[1.0][box] |= right
            sides[-1.0][box] |= component & ~right
        else:
            sides[1.0 if share > 0.5 else -1.0][box] |= component
    return [(lung, side) for side, lung in sides.items() if lung.any()]


def _rib_cage(
    ct: np.ndarray, body: np.ndarray, lungs: np.ndarray, spacing: np.ndarray, bone_hu: float, near_mm: float
) -> np.ndarray:
    """The rib cage round the lungs, ``(Z, Y, X)`` bool: bone (``>= bone_hu``) inside the body within ``near_mm`` of
    the lungs (ribs, vertebrae, sternum; not the arms)."""
    box = ndimage.find_objects(lungs.astype(np.int8))[0]
    pad = [int(math.ceil(near_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, lungs.shape))
    near = np.zeros_like(lungs)
    near[box] = ndimage.distance_transform_edt(~lungs[box], sampling=spacing) <= near_mm
    return (ct >= bone_hu) & body & near


def _pleural_fill(
    lung: np.ndarray,
    other: np.ndarray,
    body: np.ndarray,
    cage: np.ndarray,
    current: int,
    bone: np.ndarray,
    spacing: np.ndarray,
    side: float,
    x_mid: float,
    midline_margin_mm: float,
    pleural_gap_mm: float,
    reach_mm: float,
) -> np.ndarray:
    """Dense tissue between one lung and its ribs, ``(Y, X) -> (Y, X)`` bool: what a lesion on the pleura hides.

    Rays every degree from the lung's centroid go outwards from the outermost lung pixel. Rays that come within
    ``midline_margin_mm`` of the midline column ``x_mid`` or meet the other lung before leaving the body look into
    the mediastinum and are ignored. The inner surface of the chest wall is where a ray first meets the rib cage
    (``cage``, ``(S, Y, X)``: the cage of this slice, index ``current``, and of its neighbours, see
    :func:`_rib_cage`): in this slice if a rib is there, else, as ribs run obliquely and an axial slice shows them
    over part of the circumference only, the median over the neighbouring slices that have one on the ray; rays
    that meet no rib are ignored. Normally the lung reaches
    it, less the pleura (``pleural_gap_mm``, at least one pixel); where it stops short by two pixels or more, dense
    tissue (consolidation, a pleural-based mass, atelectasis) lies against the pleura, and the wedge between that
    ray and the next is filled out to the pleura. Pixels of bone, of the other lung and outside the body are never
    added.
    """
    from skimage.draw import polygon

    out = np.zeros_like(lung)
    rows, cols = np.nonzero(lung)
    if rows.size < 3 or not cage.any():
        return out
    step = float(spacing.min())
    centre = np.array([rows.mean(), cols.mean()]) * spacing
    angles = np.deg2rad(np.arange(0.0, 360.0, 1.0))
    directions = np.stack([np.sin(angles), np.cos(angles)], axis=1)
    # far enough to pass the lung's outermost pixel and the widest gap to a rib (the cage is within reach_mm)
    reach = float(np.hypot(*(np.stack([rows, cols], axis=1) * spacing - centre).T).max()) + reach_mm
    distances = step * np.arange(1, int(reach / step) + 2)
    points = (centre + distances[None, :, None] * directions[:, None, :]) / spacing  # (ray, step, yx) pixels
    idx = np.rint(points).astype(np.int64)
    inside = (idx >= 0).all(-1) & (idx[..., 0] < lung.shape[0]) & (idx[..., 1] < lung.shape[1])
    idx = np.where(inside[..., None], idx, 0)
    at = (idx[..., 0], idx[..., 1])
    before_exit = np.cumprod(inside & body[at], axis=1).astype(bool)
    medial = side * (points[..., 1] - x_mid) * spacing[1] < midline_margin_mm
    mediastinal = (before_exit & (medial | other[at])).any(axis=1)
    on_lung = before_exit & lung[at]
    n = distances.size
    last_lung = n - 1 - np.argmax(on_lung[:, ::-1], axis=1)
    beyond = np.arange(n)[None, :] > last_lung[:, None]
    on_cage = beyond[None] & before_exit[None] & cage[:, at[0], at[1]]  # (slice, ray, step)
    hit = on_cage.any(axis=2)
    first = np.where(hit, np.argmax(on_cage, axis=2), np.nan)
    with warnings.catch_warnings():  # rays that meet no rib in any slice stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        neighbours = np.nanmedian(first, axis=0)
    wall = np.where(hit[current], first[current], neighbours)
    valid = on_lung.any(axis=1) & np.isfinite(wall) & ~mediastinal
    fill_to = np.where(valid, wall, 0).astype(np.int64) - 1 - int(pleural_gap_mm // step)
    thick = valid & (fill_to > last_lung + 2)  # three pixels of dense tissue at least: not the partial volume
    for j in np.flatnonzero(thick):
        k = (j + 1) % len(angles)
        # the wedge to the next ray, where both rays leave the lung and meet the rib at nearly the same distances
        if thick[k] and abs(last_lung[k] - last_lung[j]) <= 3 and abs(fill_to[k] - fill_to[j]) <= 3:
            corners = np.array(
                [points[j, last_lung[j]], points[j, fill_to[j]], points[k, fill_to[k]], points[k, last_lung[k]]]
            )
            rr, cc = polygon(corners[:, 0], corners[:, 1], lung.shape)
            out[rr, cc] = True
        spoke = slice(last_lung[j], fill_to[j] + 1)
        out[idx[j, spoke, 0], idx[j, spoke, 1]] = True
    return out & body & ~bone & ~other & ~lung


def _vertical_extent(lung: np.ndarray, spacing: np.ndarray, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed lowest and highest slice of the lung in every ``(y, x)`` column, ``(Z, Y, X) -> 2 x (Y, X)``.

    The lowest air slice of a column traces the diaphragm under the lung; a lesion or atelectasis resting on it
    raises it locally. A grey opening of the floor (and closing of the ceiling) with a square of half-width
    ``radius_mm`` removes such narrow bumps and keeps the broad dome. Columns without lung get -1 (floor) and
    ``Z`` (ceiling), so they never restrict anything, and next to them the filtering relaxes both limits: the
    outer rim of the lung, where lesions lie against the chest wall, is restricted least.
    """
    has = lung.any(axis=0)
    z = lung.shape[0]
    floor = np.where(has, lung.argmax(axis=0), -1)
    ceiling = np.where(has, z - 1 - lung[::-1].argmax(axis=0), z)
    size = [2 * int(math.ceil(radius_mm / s)) + 1 for s in spacing[1:]]
    return ndimage.grey_opening(floor, size=size), ndimage.grey_closing(ceiling, size=size)


def lung_mask(
    ct_hu: np.ndarray,
    spacing: Sequence[float],
    threshold: float = -320.0,
    min_lung_volume_ml: float = 50.0,
    second_lung_ratio: float = 0.2,
    closing_radius_mm: float = 20.0,
    pleural_correction: bool = True,
    airway_max_area_mm2: float = 800.0,
    airway_midline_mm: float = 40.0,
    dome_radius_mm: float = 10.0,
    bone_hu: float = 200.0,
    rib_distance_mm: float = 30.0,
    rib_slab_mm: float = 15.0,
    midline_margin_mm: float = 30.0,
    pleural_gap_mm: float = 1.0,
    seal_radius_mm: float = 5.0,
    name: str = "CT volume",
) -> np.ndarray:
    """Classical lung segmentation of a chest CT in Hounsfield units, ``(Z, Y, X) -> (Z, Y, X)`` bool.

    No weights are involved; the steps are:

    1. air candidates: ``ct_hu < threshold`` (-320 HU separates aerated lung from soft tissue);
    2. air outside the body: 3D connected components (6-connectivity) of the candidates that touch one
       of the four in-plane faces of the volume (y = 0, y = end, x = 0, x = end) are removed (the rest of the
       volume is the body). The z faces are deliberately not used, because scans cut at the apex or base leave
       the lungs touching them;
    3. lungs: the largest remaining component is kept if its volume is at least ``min_lung_volume_ml``,
       and the second largest as well if it is at least ``second_lung_ratio`` times the largest (two
       lungs); one component is kept when the lungs touch (or are joined by the airways). Bowel gas and
       small enclosed air pockets fall below the ratio;
    4. airways: in each axial slice, air regions smaller than ``airway_max_area_mm2`` whose centre lies within
       ``airway_midline_mm`` of the midline (the body's mean column) are the trachea and main bronchi, and are
       removed (they are mediastinum, and they join the lungs);
    5. sides: what remains is split into the right and left lung (by 3D component, or at the midline where a
       component straddles it); every following step is done per lung, so that the two are never bridged across
       the mediastinum;
    6. vessels and small dents: each lung is closed by a ball of ``closing_radius_mm`` (millimetres, exact for
       anisotropic voxels), which pulls in the vessels of the hilum and lesions up to about twice the radius wide;
    7. pleural correction (``pleural_correction``, :func:`_pleural_fill`): dense disease against the costal pleura
       (subpleural consolidation, pleural-based masses, dependent atelectasis) leaves the air mask short of the
       chest wall by its own depth, over its whole width, so no closing or hull of the air can restore it. The
       rib cage says where the chest wall is: bone within ``rib_distance_mm`` of the lungs (:func:`_rib_cage`).
       In each axial slice, rays from the lung's centroid measure the gap between the outermost lung pixel and
       the first rib (of this slice, or the median of the slices within ``rib_slab_mm``: an axial slice cuts
       the oblique ribs over part of the circumference only); where the gap exceeds the pleura
       (``pleural_gap_mm``) by three pixels or more, the tissue in between is filled. Rays that come within
       ``midline_margin_mm`` of the midline or meet the other lung look into the mediastinum and are never
       used: the heart, the hilum and the mediastinal surface stay out. Then the result is closed in-plane
       by a disk of ``seal_radius_mm`` (the thin gaps between filled wedges and the lung);
    8. holes are filled in every axial slice, per lung, which includes vessels, airway walls and any lesion the
       lung surrounds in-plane whatever its density (up to consolidation HU and beyond);
    9. the diaphragm stays out: what steps 6-8 add must lie between the lowest and the highest lung slice of its
       ``(y, x)`` column (each smoothed by a grey opening / closing of half-width ``dome_radius_mm``, which
       removes the narrow bumps of lesions resting on the diaphragm and keeps the broad dome), so the dome under a
       lung ring at the base is not filled in.

    Measured on the synthetic chest CT (:func:`common.data.synthetic.chest_ct.make_chest_ct_case` with
    ``pleural_lesions=True``; see the COVID model card for the figures): the pleural-based lesions are kept
    (>= 98 % of their voxels at 512 x 512 in-plane; the mask of the previous version kept 6-57 %), and the mask
    adds 2-5 % of the lung volume outside the true lungs (the previous one 4-10 %). Limits worth knowing:
    lesions against the *mediastinal* pleura are restored only as far as the closing reaches; a lesion in the
    paravertebral gutter (rays near the midline) or between ribs that no nearby slice shows is left out; at a
    lung's lowest slices a lesion that takes the whole rim of the lung ring leaves no air to start from; towards
    the apex, where the cage narrows fast, a slab's ribs can lie outside the slice's own and some chest wall is
    let in. Large airways inside the lungs are part of the mask. Cost: about 20 s for a 61 x 512 x 512 volume on
    one (shared) core, mostly the distance transforms of the closings and the rays.

    Args:
        ct_hu: CT volume ``(Z, Y, X)`` in Hounsfield units.
        spacing: voxel size ``(z, y, x)`` in millimetres.
        threshold: HU below which a voxel counts as air. Default -320.
        min_lung_volume_ml: smallest accepted lung (largest component), in millilitres. Default 50.
        second_lung_ratio: the second component is kept when its volume is at least this fraction of
            the largest. Default 0.2.
        closing_radius_mm: radius of the per-lung ball closing, in mm; 0 disables it. Default 20.
        pleural_correction: fill dense tissue between the lungs and the ribs (step 7). Default True.
        airway_max_area_mm2: largest axial area of a removed airway, mm^2; 0 disables step 4. Default 800.
        airway_midline_mm: largest distance of a removed airway's centre from the midline, mm. Default 40.
        dome_radius_mm: half-width of the smoothing of step 9, mm. Default 10.
        bone_hu: HU from which a voxel is bone (the rib cage). Default 200.
        rib_distance_mm: bone farther than this from the lungs is not rib cage (arms, scapulae), mm. Default 30.
        rib_slab_mm: half-height of the slab of slices whose ribs stand in for a slice's missing ones, mm.
            Default 15.
        midline_margin_mm: rays closer than this to the midline are mediastinal, mm. Default 30.
        pleural_gap_mm: the normal gap between lung and rib (pleura), mm. Default 1.
        seal_radius_mm: radius of the in-plane closing after step 7, mm; 0 disables it. Default 5.
        name: file name or case id used in error messages.

    Returns:
        Boolean lung mask, same shape as ``ct_hu``.

    Raises:
        DataError: not 3D, smaller than :data:`MIN_CT_SHAPE`, NaN/Inf values, constant volume, no air
            below ``threshold`` (not in HU?), or no air region inside the body large enough to be a lung.
    """
    if not 0.0 <= second_lung_ratio <= 1.0:
        raise ValueError(f"second_lung_ratio must be in [0, 1], got {second_lung_ratio}")
    sizes = (closing_radius_mm, min_lung_volume_ml, airway_max_area_mm2, airway_midline_mm, dome_radius_mm)
    sizes += (rib_distance_mm, rib_slab_mm, midline_margin_mm, pleural_gap_mm, seal_radius_mm)
    if min(sizes) < 0:
        raise ValueError("the sizes and distances of lung_mask must be >= 0")
    ct, sp = _check_ct(ct_hu, spacing, name)
    air = ct < threshold
    if not air.any():
        raise DataError(
            name, f"no voxel below {threshold:g} HU (minimum {float(ct.min()):g}): is the volume in Hounsfield units?"
        )
    labels, n = ndimage.label(air)
    outside = np.unique(
        np.concatenate([labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]], axis=None)
    )
    outside = outside[outside > 0]
    volumes_ml = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64) * float(np.prod(sp)) / 1000.0
    volumes_ml[0] = 0.0
    volumes_ml[outside] = 0.0
    order = np.argsort(volumes_ml)[::-1]
    largest = volumes_ml[order[0]]
    if largest < max(min_lung_volume_ml, 1e-9):
        raise DataError(
            name,
            f"no lung found: the largest air region inside the body is {largest:.1f} mL "
            f"(< {min_lung_volume_ml:g} mL); check the HU scaling and that the body is inside the field of view",
        )
    kept = [int(order[0])]
    if n > 1 and volumes_ml[order[1]] >= max(second_lung_ratio * largest, min_lung_volume_ml, 1e-9):
        kept.append(int(order[1]))
    found = np.isin(labels, kept)
    body = ~np.isin(labels, outside)
    lung_slices = found.any(axis=(1, 2))
    x_mid = float(np.nonzero(body[lung_slices])[2].mean())
    if airway_max_area_mm2 > 0:
        without_airways = _remove_mediastinal_airways(found, sp, x_mid, airway_max_area_mm2, airway_midline_mm)
        found = without_airways if without_airways.any() else found
    lungs = _split_lungs(found, x_mid)
    closed = []
    for air, side in lungs:
        lung = air
        if closing_radius_mm > 0:
            # close inside the lung's bounding box only: cheap, and the closing of a set never leaves it
            box = ndimage.find_objects(lung.astype(np.int8))[0]
            lung = lung.copy()
            lung[box] = _ball_closing(lung[box], closing_radius_mm, sp)
        closed.append((lung, air, side))
    if pleural_correction:
        bone = ct >= bone_hu
        cage = _rib_cage(ct, body, found, sp, bone_hu, rib_distance_mm)
        slab = int(round(rib_slab_mm / sp[0]))
    mask = np.zeros(ct.shape, dtype=bool)
    for k, (lung, air, side) in enumerate(closed):
        other = closed[1 - k][0] if len(closed) == 2 else np.zeros_like(lung)
        pleural = np.zeros_like(lung)
        if pleural_correction:
            for z in np.flatnonzero(lung.any(axis=(1, 2))):
                pleural[z] = _pleural_fill(
                    lung[z],
                    other[z],
                    body[z],
                    cage[max(z - slab, 0) : z + slab + 1],
                    min(z, slab),
                    bone[z],
                    sp[1:],
                    side,
                    x_mid,
                    midline_margin_mm,
                    pleural_gap_mm,
                    rib_distance_mm + 5.0,
                )
        corrected = lung | pleural
        if seal_radius_mm > 0:
            # seal the narrow gaps left between the filled wedges and the lung, so that hole filling closes them
            box = ndimage.find_objects(corrected.astype(np.int8))[0]
            corrected[box] = _ball_closing(corrected[box], seal_radius_mm, np.array([1e6, sp[1], sp[2]]))
        added = _fill_holes_per_slice(corrected) & ~air
        # what steps 6-8 add must lie between the lung's floor and ceiling: not the diaphragm (its dome under the
        # lung, its costal part in the costophrenic recess below the lung's lowest slices)
        floor, ceiling = _vertical_extent(air, sp, dome_radius_mm)
        levels = np.arange(lung.shape[0])[:, None, None]
        mask |= air | (added & (levels >= floor) & (levels <= ceiling))
    return mask


def lung_bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> np.ndarray:
    """Bounding box of a non-empty mask, enlarged by ``margin`` voxels per side and clipped to the volume.

    Args:
        mask: boolean array of any dimensionality (``(Z, Y, X)`` here).
        margin: voxels added on both sides, one number or one per axis.

    Returns:
        int64 array ``(ndim, 2)`` of ``[start, stop)`` per axis, so ``array[tuple(slice(*r) for r in box)]``
        is the crop.
    """
    mask = np.asarray(mask, dtype=bool)
    margins = np.broadcast_to(np.asarray(margin, dtype=np.int64), (mask.ndim,))
    if np.any(margins < 0):
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not mask.any():
        raise ValueError("cannot take the bounding box of an empty mask")
    box = np.zeros((mask.ndim, 2), dtype=np.int64)
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box[axis] = (max(idx[0] - margins[axis], 0), min(idx[-1] + 1 + margins[axis], mask.shape[axis]))
    return box


def _resize(array: np.ndarray | torch.Tensor, shape: Sequence[int], mode: str) -> np.ndarray:
    """Resize a channel-first array ``(C, *spatial) -> (C, *shape)`` with MONAI's ``Resize``.

    ``"linear"`` is trilinear with Gaussian anti-aliasing when shrinking (as ``skimage.transform.resize``);
    ``"nearest"`` is PyTorch's ``nearest-exact``, which uses the same voxel-centre convention as the
    linear mode (``align_corners=False``), so masks and images stay aligned.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    data = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if mode == "linear":
        out = Resize(shape, mode="trilinear", align_corners=False, anti_aliasing=True)(data)
    else:
        out = Resize(shape, mode="nearest-exact")(data)
    return convert_to_numpy(out, wrap_sequence=True).astype(np.float32, copy=False)


def _check_info(info: Mapping[str, Any]) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    missing = [k for k in _INFO_KEYS if k not in info]
    if missing:
        raise ValueError(f"info lacks {missing}; pass the dict returned by preprocess_ct")
    box = np.asarray(info["box"], dtype=np.int64).reshape(3, 2)
    return (
        box,
        tuple(int(s) for s in np.asarray(info["original_shape"]).ravel()),
        tuple(int(s) for s in np.asarray(info["grid"]).ravel()),
    )


def _split_channels(array: np.ndarray | torch.Tensor, spatial: tuple[int, ...], what: str) -> tuple[np.ndarray, bool]:
    a = convert_to_numpy(array, wrap_sequence=True)
    if a.ndim == 3:
        a, squeeze = a[None], True
    elif a.ndim == 4:
        squeeze = False
    else:
        raise ValueError(f"{what} must be (Z, Y, X) or (C, Z, Y, X), got shape {tuple(a.shape)}")
    if tuple(a.shape[1:]) != spatial:
        raise ValueError(f"{what} has spatial shape {tuple(a.shape[1:])}, expected {spatial}")
    return a, squeeze


def resample_to_grid(array: np.ndarray | torch.Tensor, info: Mapping[str, Any], mode: str = "nearest") -> np.ndarray:
    """Map an array on the original CT grid onto the preprocessing grid: crop to the lung box, resize.

    Use it for anything that must follow the CT, e.g. the reference lesion masks
    (``(Z, Y, X) -> grid`` or ``(C, Z, Y, X) -> (C, *grid)``). ``mode``: ``"nearest"`` (masks, default) or
    ``"linear"`` (intensities).
    """
    box, original_shape, grid = _check_info(info)
    a, squeeze = _split_channels(array, original_shape, "array")
    crop = a[(slice(None), *(slice(int(s), int(e)) for s, e in box))]
    out = _resize(crop, grid, mode)
    return out[0] if squeeze else out


def restore_to_original(
    pred_on_grid: np.ndarray | torch.Tensor, info: Mapping[str, Any], mode: str = "nearest"
) -> np.ndarray:
    """Map a prediction on the preprocessing grid back onto the original CT grid.

    The prediction is resized to the lung-box size (``mode="nearest"`` for masks, the default, or
    ``"linear"`` for probabilities) and placed inside the box; everything outside the box is 0.
    ``grid -> original_shape`` or ``(C, *grid) -> (C, *original_shape)``, float32.
    """
    box, original_shape, grid = _check_info(info)
    a, squeeze = _split_channels(pred_on_grid, grid, "pred_on_grid")
    out = np.zeros((a.shape[0], *original_shape), dtype=np.float32)
    out[(slice(None), *(slice(int(s), int(e)) for s, e in box))] = _resize(a, tuple(int(e - s) for s, e in box), mode)
    return out[0] if squeeze else out


def preprocess_ct(
    ct_hu: np.ndarray,
    spacing: Sequence[float],
    grid: Sequence[int] = (32, 128, 128),
    window: tuple[float, float] = (-1000.0, 400.0),
    margin: int | Sequence[int] = 2,
    name: str = "CT volume",
    **lung_kwargs: Any,
) -> dict[str, Any]:
    """Preprocess a chest CT as in Shabani et al.: window, mask the lungs, crop to them, resample.

    ``(Z, Y, X)`` HU volume -> ``grid`` (default ``(32, 128, 128)``, z y x). The windowed image is set to 0
    outside the lungs, cropped to the lung bounding box (plus ``margin`` voxels), resized (trilinear with
    anti-aliasing) and multiplied by the resized lung mask, so voxels outside the lungs are exactly 0 on
    the grid and lung voxels are not blurred with the chest wall.

    Args:
        ct_hu: CT volume ``(Z, Y, X)`` in Hounsfield units (see the module docstring for NIfTI order).
        spacing: voxel size ``(z, y, x)`` in mm.
        grid: output shape ``(z, y, x)``. Default ``(32, 128, 128)``.
        window: HU window ``(lo, hi)`` mapped to ``[0, 1]``. Default ``(-1000, 400)``.
        margin: voxels of the original grid added around the lung box, per side (one number or z, y, x).
        name: file name or case id used in error messages.
        lung_kwargs: passed to :func:`lung_mask` (``threshold``, ``closing_radius_mm``, ...).

    Returns:
        dict with ``"image"`` (float32 ``grid``, in [0, 1], 0 outside the lungs), ``"lung"`` (bool ``grid``),
        ``"box"`` (int64 ``(3, 2)`` ``[start, stop)`` in original z y x voxels), ``"original_shape"``
        (3-tuple), ``"grid"`` (3-tuple) and ``"grid_spacing"`` (mm, z y x); the last four are what
        :func:`restore_to_original` and :func:`resample_to_grid` need.
    """
    grid_t = tuple(int(g) for g in grid)
    if len(grid_t) != 3 or any(g < 1 for g in grid_t):
        raise ValueError(f"grid must be 3 positive sizes (z, y, x), got {tuple(grid)}")
    ct, sp = _check_ct(ct_hu, spacing, name)
    lung = lung_mask(ct, sp, name=name, **lung_kwargs)
    box = lung_bounding_box(lung, margin)
    info: dict[str, Any] = {"box": box, "original_shape": tuple(int(s) for s in ct.shape), "grid": grid_t}
    image = hu_window(ct, *window) * lung
    image_grid = resample_to_grid(image, info, mode="linear")
    lung_grid = resample_to_grid(lung, info, mode="nearest") > 0.5
    info["image"] = (image_grid * lung_grid).astype(np.float32)
    info["lung"] = lung_grid
    info["grid_spacing"] = tuple(float(sp[a] * (box[a, 1] - box[a, 0]) / grid_t[a]) for a in range(3))
    return info


def _grid_to_input_index(info: Mapping[str, Any], input_axes: str) -> np.ndarray:
    """4x4 matrix from grid voxel indices (z, y, x) to voxel indices of the input array (``input_axes``).

    Grid voxel ``k`` along an axis of crop length ``L`` and grid size ``G`` has its centre at crop
    coordinate ``(k + 0.5) * L / G - 0.5`` (the ``align_corners=False`` convention of the resizing).
    """
    box, _, grid = _check_info(info)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a in range(3):  # a: grid axis in z, y, x order
        scale = (box[a, 1] - box[a, 0]) / grid[a]
        row = a if input_axes == "zyx" else 2 - a
        m[row, a] = scale
        m[row, 3] = box[a, 0] + 0.5 * scale - 0.5
    return m


def _affine_of(img: Any, meta: Mapping[str, Any] | None) -> np.ndarray | None:
    if isinstance(img, MetaTensor):
        return convert_to_numpy(img.affine, wrap_sequence=True).astype(np.float64)
    if meta is not None and "affine" in meta:
        return np.asarray(convert_to_numpy(meta["affine"], wrap_sequence=True), dtype=np.float64)
    return None


class LungPreprocessd(MapTransform, InvertibleTransform):
    """Dictionary transform running :func:`preprocess_ct` on a CT key, for bundle configs; invertible.

    Input: the CT as MONAI gives it, channel-first ``(1, X, Y, Z)`` in HU (``input_axes="xyz"``, the
    default, for NIfTI read by ``LoadImaged`` + ``EnsureChannelFirstd``) or ``(1, Z, Y, X)``
    (``input_axes="zyx"``). The voxel spacing comes from the affine of the MetaTensor (or of the
    ``<key>_meta_dict``). Output:

    - ``data[key]``: ``(1, *grid)`` float32 in ``(z, y, x)`` order, windowed, 0 outside the lungs;
    - ``data[lung_key]``: ``(1, *grid)`` float32 lung mask (0/1);
    - each of ``label_keys`` (e.g. reference lesion masks on the CT grid): cropped and resized to the
      grid with nearest interpolation, ``(1, *grid)``.

    Every output MetaTensor gets an affine mapping grid voxels to the same world positions as before,
    and its meta dict gains ``"lung_box"`` (``(3, 2)`` z y x voxels of the original grid),
    ``"lung_original_shape"`` and ``"lung_grid"``, which :class:`LungRestored` reads. The transform is
    also invertible the MONAI way: ``Invertd(keys="pred", transform=preprocessing, orig_keys="image",
    nearest_interp=True)`` maps a prediction back to the original ``(1, X, Y, Z)`` grid and affine
    (0 outside the lung box).

    Args:
        keys: the CT key (exactly one).
        grid: output shape ``(z, y, x)``. Default ``(32, 128, 128)``.
        label_keys: keys resampled like the CT with nearest interpolation (no windowing, no masking).
        lung_key: key receiving the resampled lung mask. Default ``"lung"``.
        window: HU window mapped to [0, 1]. Default ``(-1000, 400)``.
        margin: voxels added around the lung box (original grid). Default 2.
        input_axes: ``"xyz"`` (default) or ``"zyx"``, the order of the input's spatial axes.
        meta_key_postfix: postfix of the meta dict used when the input is not a MetaTensor.
        allow_missing_keys: skip label keys that are absent.
        lung_kwargs: passed to :func:`lung_mask`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        grid: Sequence[int] = (32, 128, 128),
        label_keys: KeysCollection = (),
        lung_key: str = "lung",
        window: tuple[float, float] = (-1000.0, 400.0),
        margin: int | Sequence[int] = 2,
        input_axes: str = "xyz",
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
        **lung_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LungPreprocessd takes exactly one CT key, got {self.keys}")
        if input_axes not in ("xyz", "zyx"):
            raise ValueError(f"input_axes must be 'xyz' or 'zyx', got {input_axes!r}")
        self.grid = tuple(int(g) for g in grid)
        if len(self.grid) != 3 or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be 3 positive sizes (z, y, x), got {tuple(grid)}")
        self.label_keys = tuple(label_keys) if isinstance(label_keys, (list, tuple)) else (label_keys,)
        self.lung_key = lung_key
        self.window = window
        self.margin = margin
        self.input_axes = input_axes
        self.meta_key_postfix = meta_key_postfix
        self.lung_kwargs = lung_kwargs

    def _to_zyx(self, a: np.ndarray) -> np.ndarray:
        return a if self.input_axes == "zyx" else np.transpose(a, (2, 1, 0))

    def _from_zyx(self, a: np.ndarray) -> np.ndarray:
        return a if self.input_axes == "zyx" else np.transpose(a, (0, 3, 2, 1))

    def _output(self, src: Any, array: np.ndarray, info: dict[str, Any], affine: np.ndarray, mode: str) -> MetaTensor:
        meta = {k: v for k, v in src.meta.items() if k != "affine"} if isinstance(src, MetaTensor) else {}
        meta.update(
            lung_box=np.asarray(info["box"]),
            lung_original_shape=np.asarray(info["original_shape"]),
            lung_grid=np.asarray(info["grid"]),
        )
        new_affine = affine @ _grid_to_input_index(info, self.input_axes)
        out = MetaTensor(
            torch.as_tensor(array[None], dtype=torch.float32), affine=torch.as_tensor(new_affine), meta=meta
        )
        if isinstance(src, MetaTensor):
            out.applied_operations = list(src.applied_operations)
        extra = {
            "box": np.asarray(info["box"]),
            "original_shape": np.asarray(info["original_shape"]),
            "grid": np.asarray(info["grid"]),
            "affine": affine,
            "mode": mode,
        }
        shape = tuple(info["original_shape"])
        self.push_transform(out, orig_size=shape if self.input_axes == "zyx" else shape[::-1], extra_info=extra)
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        name = str(d.get("case_id", key))
        img = d[key]
        meta = d.get(f"{key}_{self.meta_key_postfix}")
        if isinstance(img, MetaTensor) and img.meta.get("filename_or_obj"):
            name = str(img.meta["filename_or_obj"])
        elif isinstance(meta, Mapping) and meta.get("filename_or_obj"):
            name = str(meta["filename_or_obj"])
        arr = convert_to_numpy(img, wrap_sequence=True)
        if arr.ndim != 4 or arr.shape[0] != 1:
            raise DataError(name, f"expected a single-channel CT (1, X, Y, Z), got shape {tuple(arr.shape)}")
        affine = _affine_of(img, meta)
        if affine is None:
            raise DataError(name, "no affine found (neither a MetaTensor nor a meta dict): the spacing is unknown")
        spacing_in = affine_to_spacing(affine, r=3)
        spacing_zyx = spacing_in if self.input_axes == "zyx" else spacing_in[::-1]
        info = preprocess_ct(
            self._to_zyx(arr[0]), spacing_zyx, self.grid, self.window, self.margin, name=name, **self.lung_kwargs
        )
        d[key] = self._output(img, info["image"], info, affine, "trilinear")
        d[self.lung_key] = self._output(img, info["lung"].astype(np.float32), info, affine, "nearest")
        for label_key in self.label_keys:
            if label_key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"label key {label_key!r} not in the data")
            lab = convert_to_numpy(d[label_key], wrap_sequence=True)
            if lab.shape != arr.shape:
                raise DataError(name, f"{label_key} has shape {tuple(lab.shape)}, the CT {tuple(arr.shape)}")
            lab_grid = resample_to_grid(self._to_zyx(lab[0]), info, mode="nearest")
            d[label_key] = self._output(d[label_key], lab_grid, info, affine, "nearest")
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map each of ``keys``, ``label_keys`` and ``lung_key`` present back to the original grid."""
        d = dict(data)
        for key in (*self.keys, *self.label_keys, self.lung_key):
            if key not in d or not isinstance(d[key], MetaTensor):
                continue
            op = self.pop_transform(d[key])
            extra = op[TraceKeys.EXTRA_INFO]
            mode = "nearest" if str(extra["mode"]).startswith("nearest") else "linear"
            arr = convert_to_numpy(d[key], wrap_sequence=True)
            restored = restore_to_original(arr, extra, mode=mode)
            out = MetaTensor(
                torch.as_tensor(self._from_zyx(restored), dtype=torch.float32),
                affine=torch.as_tensor(np.asarray(extra["affine"], dtype=np.float64)),
                meta={k: v for k, v in d[key].meta.items() if not k.startswith("lung_") and k != "affine"},
            )
            out.applied_operations = d[key].applied_operations
            d[key] = out
        return d


class LungRestored(MapTransform):
    """Map predictions on the lung grid back to the original CT grid from the meta dict of ``info_key``.

    The meta-dict route, for pipelines that do not keep MONAI's applied-operation stack: the info
    written by :class:`LungPreprocessd` (``lung_box``, ``lung_original_shape``, ``lung_grid``) and the
    original affine are read from ``data[info_key]`` (a MetaTensor produced by it). Each key
    ``(C, *grid)`` becomes ``(C, X, Y, Z)`` (or ``(C, Z, Y, X)`` for ``input_axes="zyx"``), 0 outside the
    lung box, with the original affine.

    Args:
        keys: prediction keys.
        info_key: key of a MetaTensor output of :class:`LungPreprocessd` (e.g. ``"image"``).
        mode: ``"nearest"`` (masks, default) or ``"linear"`` (probabilities).
        input_axes: the ``input_axes`` given to :class:`LungPreprocessd`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        info_key: str = "image",
        mode: str = "nearest",
        input_axes: str = "xyz",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in ("nearest", "linear"):
            raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
        if input_axes not in ("xyz", "zyx"):
            raise ValueError(f"input_axes must be 'xyz' or 'zyx', got {input_axes!r}")
        self.info_key = info_key
        self.mode = mode
        self.input_axes = input_axes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d.get(self.info_key)
        if not isinstance(ref, MetaTensor) or "lung_box" not in ref.meta:
            raise ValueError(f"data[{self.info_key!r}] is not an output of LungPreprocessd (no 'lung_box' in its meta)")
        info = {
            "box": convert_to_numpy(ref.meta["lung_box"], wrap_sequence=True),
            "original_shape": convert_to_numpy(ref.meta["lung_original_shape"], wrap_sequence=True),
            "grid": convert_to_numpy(ref.meta["lung_grid"], wrap_sequence=True),
        }
        grid_affine = convert_to_numpy(ref.affine, wrap_sequence=True).astype(np.float64)
        affine = grid_affine @ np.linalg.inv(_grid_to_input_index(info, self.input_axes))
        for key in self.key_iterator(d):
            restored = restore_to_original(d[key], info, mode=self.mode)
            if restored.ndim == 3:
                restored = restored[None]
            if self.input_axes == "xyz":
                restored = np.transpose(restored, (0, 3, 2, 1))
            meta = {k: v for k, v in ref.meta.items() if not k.startswith("lung_") and k != "affine"}
            d[key] = MetaTensor(torch.as_tensor(restored), affine=torch.as_tensor(affine), meta=meta)
        return d
