"""Pseudo-lesion masks from the 3D inpainting GAN, and the slice classes of the contrastive phase.

Shabani et al., "Self-supervised region-aware segmentation of COVID-19 CT images using 3D GAN and
contrastive learning", Computers in Biology and Medicine 2022: the generator turns a COVID-19 volume
into a synthetic healthy one; what it removed, ``input - G(input)`` (both min-max normalised), inside the
lungs and thresholded, is the pseudo-lesion mask. Axial slices are then labelled by their pseudo-lesion
burden ("high" above the upper quartile, "low" between the quartiles) for the supervised contrastive
terms of the TransUNet (:mod:`common.losses.contrastive`).

Volumes are ``(Z, Y, X)`` (axial slices along axis 0), as produced by :mod:`common.data.chest_ct`.

The obvious unsupervised alternative to the GAN's labels, for comparing like with like: an HU window inside the
lung (:func:`hu_window_mask`), its lower bound found by Otsu's method on the lung voxels of studies without masks
(:func:`otsu_lung_window`).

How the bundle's stages hand these over (``bundles/covid_ct_gan_transunet_segmentation``): the pseudo-mask
stage writes ``<pseudo_mask_dir>/<case>_pseudo.nii.gz`` on each study's original CT grid and one
``slice_classes.json`` (:func:`save_slice_classes`); the TransUNet stage finds the masks with
:func:`attach_pseudo_masks` and the classes with :func:`load_slice_classes`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.filters import threshold_otsu

from common.errors import DataError
from common.io import atomic_path

__all__ = [
    "PSEUDO_MASK_POSTFIX",
    "PseudoMaskd",
    "SliceBurdend",
    "attach_pseudo_masks",
    "classes_by_case",
    "healthy_category_key",
    "hu_window_mask",
    "load_slice_classes",
    "otsu_lung_window",
    "pseudo_mask",
    "residual_map",
    "save_slice_classes",
    "slice_burden",
    "slice_classes",
    "slice_classes_grid",
]

#: file name postfix of the pseudo-mask NIfTIs: ``<case>_pseudo.nii.gz``.
PSEUDO_MASK_POSTFIX = "_pseudo"


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


def hu_window_mask(
    ct_hu: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor, window: Sequence[float]
) -> np.ndarray:
    """The HU-window lesion rule: ``lung & lo <= HU <= hi``, any equal shapes, bool."""
    lo, hi = (float(w) for w in window)
    if not hi > lo:
        raise ValueError(f"the window needs hi > lo, got {tuple(window)}")
    ct, m = _as_numpy(ct_hu), _as_numpy(lung) > 0
    if ct.shape != m.shape:
        raise ValueError(f"ct {ct.shape} and lung {m.shape} must have the same shape")
    return m & (ct >= lo) & (ct <= hi)


def otsu_lung_window(
    lung_hu: Sequence[np.ndarray], upper: float = 100.0, max_values: int = 2_000_000
) -> tuple[float, float]:
    """An HU window for lesions found without any reference mask: ``(Otsu threshold of the lung HU, upper)``.

    Aerated parenchyma (about -850 HU) and what is denser than it (ground glass, consolidation, but also vessels)
    make the HU histogram inside the lungs bimodal; Otsu's threshold between the two modes is the window's lower
    bound. ``upper`` (default +100 HU, above consolidation) keeps bone and calcification out. Pass the lung voxels
    of the COVID-19 training studies (a flat array per study); at most ``max_values`` evenly strided values are
    used, so the result is deterministic.
    """
    values = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in lung_hu]) if len(lung_hu) else []
    if len(values) < 2:
        raise ValueError("no lung voxels given: the window needs the lungs of at least one study")
    values = values[:: max(1, len(values) // max_values)]
    values = np.clip(values, -1000.0, upper)
    if values.min() == values.max():
        raise ValueError("the lung voxels all have one value: no threshold to find")
    return float(threshold_otsu(values)), float(upper)


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


class PseudoMaskd(MapTransform):
    """Replace the generator output under ``keys`` by the pseudo-lesion mask of :func:`pseudo_mask`.

    ``data[key]`` is ``G(image)``, ``(1, Z, Y, X)``; it becomes the float32 mask ``(1, Z, Y, X)`` (0/1) with the
    same type and meta data (so MONAI's ``Invertd`` can map it back to the CT grid afterwards). Studies known
    to be healthy from their category (``data[healthy_key]`` in ``healthy_values``, MosMed's ``CT-0``) get an
    empty mask: what the generator changes in a normal lung is noise, not lesion.

    Args:
        keys: key(s) of the generator output.
        image_key: the generator input ``(1, Z, Y, X)``.
        lung_key: the lung mask ``(1, Z, Y, X)``.
        threshold: see :func:`pseudo_mask` (a number in [0, 1) or ``"otsu"``). Default 0.1.
        healthy_key: key of the study's category, or ``None`` to treat every study alike. Default ``"category"``.
        healthy_values: categories whose mask is empty. Default ``("CT-0",)``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        lung_key: str = "lung",
        threshold: float | str = 0.1,
        healthy_key: str | None = "category",
        healthy_values: Sequence[str] = ("CT-0",),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(threshold, str):
            if threshold != "otsu":
                raise ValueError(f"threshold must be a number in [0, 1) or 'otsu', got {threshold!r}")
        elif not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"a numeric threshold must be in [0, 1), got {threshold}")
        self.image_key = image_key
        self.lung_key = lung_key
        self.threshold = threshold
        self.healthy_key = healthy_key
        self.healthy_values = {str(v) for v in healthy_values}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        healthy = self.healthy_key is not None and str(d.get(self.healthy_key)) in self.healthy_values
        image, lung = _as_numpy(d[self.image_key]), _as_numpy(d[self.lung_key]) > 0
        for key in self.key_iterator(d):
            generated = _as_numpy(d[key])
            if not generated.shape == image.shape == lung.shape or generated.ndim != 4 or generated.shape[0] != 1:
                raise ValueError(
                    f"{key!r}, {self.image_key!r} and {self.lung_key!r} must all be (1, Z, Y, X), got "
                    f"{generated.shape}, {image.shape}, {lung.shape}"
                )
            if healthy:
                mask = np.zeros(generated.shape, dtype=np.float32)
            else:
                mask = pseudo_mask(image[0], generated[0], lung[0], self.threshold)[None].astype(np.float32)
            d[key] = convert_to_dst_type(mask, d[key], dtype=torch.float32)[0]
        return d


class SliceBurdend(MapTransform):
    """Store the per-slice burden (:func:`slice_burden`) of the mask under ``keys`` as ``data[output_key]``.

    ``(1, Z, Y, X)`` mask and lung -> ``(Z,)`` float64 NumPy array, NaN for slices without lung. Run it on
    the preprocessing grid (before mapping the mask back to the CT grid): those are the slices the TransUNet
    is trained on.

    Args:
        keys: the mask key (exactly one).
        lung_key: the lung mask key.
        output_key: where the burdens go. Default ``"slice_burden"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lung_key: str = "lung",
        output_key: str = "slice_burden",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SliceBurdend takes exactly one mask key, got {self.keys}")
        self.lung_key = lung_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask, lung = _as_numpy(d[key]), _as_numpy(d[self.lung_key])
            if mask.ndim != 4 or mask.shape[0] != 1:
                raise ValueError(f"{key!r} must be (1, Z, Y, X), got {mask.shape}")
            d[self.output_key] = slice_burden(mask[0], lung[0], axis=0)
        return d


def save_slice_classes(
    path: str | os.PathLike, burdens: Mapping[str, np.ndarray], grid: Sequence[int], seed: int = 0
) -> dict[str, Any]:
    """Label every slice of every study high (1), low (0) or unused (-1) and write ``path`` (JSON) atomically.

    The quartiles are dataset-wide: :func:`slice_classes` runs on the burdens of all studies concatenated
    (in sorted case order, so the result does not depend on the order the studies were processed in).

    Args:
        path: the JSON file, e.g. ``<pseudo_mask_dir>/slice_classes.json``.
        burdens: per study, its per-slice burden ``(Z,)`` (:func:`slice_burden`, NaN for slices without lung).
        grid: the preprocessing grid ``(z, y, x)`` the burdens were computed on (checked when loading).
        seed: seed of the class balancing.

    Returns:
        the written content: ``{"grid", "seed", "quartiles", "num_high", "num_low", "cases": {case:
        {"burden": [...], "class": [...]}}}``; NaN burdens are written as ``null``.

    Raises:
        ValueError: a study's burden is not one value per grid slice, or no study is given.
    """
    grid_t = [int(g) for g in grid]
    if len(grid_t) != 3:
        raise ValueError(f"grid must be (z, y, x), got {grid}")
    cases = sorted(burdens)
    if not cases:
        raise ValueError("no study given: nothing to label")
    arrays = [np.asarray(burdens[c], dtype=np.float64).reshape(-1) for c in cases]
    for case, arr in zip(cases, arrays):
        if arr.size != grid_t[0]:
            raise ValueError(f"{case}: {arr.size} slice burdens for a grid of {grid_t[0]} slices")
    flat = np.concatenate(arrays)
    indices, labels = slice_classes(flat, seed=seed)
    classes = np.full(flat.size, -1, dtype=np.int64)
    classes[indices] = labels
    finite = flat[np.isfinite(flat)]
    quartiles = [float(q) for q in np.percentile(finite, [25, 75])] if finite.size else [None, None]
    content: dict[str, Any] = {
        "grid": grid_t,
        "seed": int(seed),
        "quartiles": quartiles,
        "num_high": int((labels == 1).sum()),
        "num_low": int((labels == 0).sum()),
        "cases": {},
    }
    for i, case in enumerate(cases):
        part = slice(i * grid_t[0], (i + 1) * grid_t[0])
        content["cases"][case] = {
            "burden": [None if not math.isfinite(b) else float(b) for b in flat[part]],
            "class": [int(c) for c in classes[part]],
        }
    # one line per header entry and per study: readable, and a few kB instead of one line per slice
    header = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in content.items() if k != "cases"]
    studies = [f"    {json.dumps(c)}: {json.dumps(v)}" for c, v in content["cases"].items()]
    text = "{\n" + ",\n".join([*header, '  "cases": {\n' + ",\n".join(studies) + "\n  }"]) + "\n}\n"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return content


def load_slice_classes(path: str | os.PathLike, grid: Sequence[int] | None = None) -> dict[str, Any]:
    """Read a file written by :func:`save_slice_classes`; check it was computed on ``grid``.

    Raises:
        DataError: the file is missing or unreadable, or its grid differs from ``grid`` (the slices would not
            be the ones the classes were computed for: run the pseudo-mask stage with the same grid).
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError as err:
        raise DataError(path, "no slice classes: run the pseudo-mask stage (configs/pseudo_masks.json) first") from err
    except (OSError, ValueError) as err:
        raise DataError(path, f"not a readable slice-classes JSON ({err})") from err
    if not isinstance(content, dict) or not {"grid", "cases"} <= set(content):
        raise DataError(path, "not a slice-classes file (needs 'grid' and 'cases')")
    if grid is not None and [int(g) for g in grid] != [int(g) for g in content["grid"]]:
        raise DataError(
            path,
            f"slice classes were computed on the grid {content['grid']}, this run uses {[int(g) for g in grid]}: "
            "run the pseudo-mask stage with the same roi_size",
        )
    return content


def slice_classes_grid(slice_classes: Mapping[str, Any] | None, default: Sequence[int]) -> Sequence[int]:
    """The grid ``(D, H, W)`` the slice classes (:func:`load_slice_classes`) were computed on, or ``default``
    without them (MONAI Label trains on annotated studies: no pseudo-mask stage, the inference grid)."""
    return slice_classes["grid"] if slice_classes else default


def classes_by_case(slice_classes: Mapping[str, Any] | None) -> dict[str, list[int]] | None:
    """``{case: [class per slice]}`` from the slice classes (:func:`load_slice_classes`), as
    :class:`~common.data.slices.VolumeSliceDataset` takes them; None without slice classes."""
    return {case: v["class"] for case, v in slice_classes["cases"].items()} if slice_classes else None


def healthy_category_key(empty_mask_for_healthy: bool, key: str = "category") -> str | None:
    """:class:`PseudoMaskd`'s ``healthy_key``: ``key`` when the studies of a healthy category get an empty mask,
    None when every study gets the generator's pseudo mask."""
    return key if empty_mask_for_healthy else None


def attach_pseudo_masks(
    items: Sequence[Mapping[str, Any]],
    pseudo_mask_dir: str | os.PathLike,
    key: str = "label",
    postfix: str = PSEUDO_MASK_POSTFIX,
) -> list[dict[str, Any]]:
    """Copies of ``items`` with ``item[key] = <pseudo_mask_dir>/<case><postfix>.nii.gz``.

    Raises:
        DataError: naming the folder and every study whose pseudo-mask file is missing; or an item already
            has ``key`` (a reference mask must never be overwritten by, or mistaken for, a pseudo-mask).
    """
    folder = os.fspath(pseudo_mask_dir)
    out, missing = [], []
    for item in items:
        if key in item:
            raise DataError(str(item.get("case")), f"already has {key!r} ({item[key]}); a training study has no mask")
        path = os.path.join(folder, f"{item['case']}{postfix}.nii.gz")
        if not os.path.isfile(path):
            missing.append(str(item["case"]))
        out.append({**item, key: path})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            folder, f"no pseudo-mask for {shown}: run the pseudo-mask stage (configs/pseudo_masks.json) first"
        )
    return out
