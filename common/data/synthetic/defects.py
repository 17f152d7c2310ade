"""Plant the defects of real-world data into one case of a synthetic dataset, in place and in the real layout.

The bundles and :mod:`common.data.integrity` are tested against the ways downloaded data really goes wrong.
:func:`plant_defect` damages one case of a folder written by
:func:`common.data.synthetic.write.write_synthetic_dataset`; every file is rewritten through ``atomic_path``.

Fatal defects (the integrity check must name the file; training must refuse the case):

=====================  ====================================================================================
``truncated``          an image file cut to half its bytes (an interrupted download or copy)
``not_nifti``          an image file replaced by an HTML error page under the same ``.nii.gz`` name
``missing_modality``   an image file removed (BraTS: one modality; MSD: the 4D image; ADNI: the PET)
``three_channels``     an image with 3 channels: MSD 4D minus its last channel; other layouts a 4D file
                       of 3 copies where a 3D volume is expected (e.g. a dynamic PET)
``nan``                a few NaN voxels in an image (float32; a MosMed CT becomes float32 for it)
``affine_mismatch``    one file's origin shifted by one voxel along the first axis (BraTS: a modality;
                       MSD and MosMed: the label; ADNI: the PET), the data unchanged
``bad_label_values``   label voxels with a value outside the convention (BraTS 2021: 3, BraTS 2023 and
                       MSD: 4, MosMed: 2)
``all_zero``           an image (MSD: its T1gd channel) set to 0 everywhere
=====================  ====================================================================================

Benign defects (:data:`BENIGN_DEFECTS`; the bundles must work, the integrity check must not complain):

=====================  ====================================================================================
``smaller_than_roi``   every file of the case resampled to a grid smaller than ``min_size`` in every axis
``non_ras``            every file reoriented (by ``seed``: LPS, PLS or ASR, other than the current one), the
                       affine updated so that every voxel keeps its world position
``anisotropic``        every file resampled to voxels three times longer along the third axis
=====================  ====================================================================================

Resampling keeps the field of view (voxel edges stay aligned: ``scipy.ndimage.zoom(grid_mode=True)`` and the
matching affine), images linearly and labels by nearest neighbour. MosMed's synthetic-only
``synthetic_truth/<study>_mask.nii.gz`` follows its study through the benign defects, so that evaluation
against it stays valid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.data.integrity import scan_layout
from common.data.labels import get_label_convention
from common.data.layouts import DatasetLayout, get_layout
from common.data.synthetic.write import write_nifti
from common.io import atomic_path

__all__ = ["BENIGN_DEFECTS", "DEFECTS", "FATAL_DEFECTS", "applicable_defects", "eligible_cases", "plant_defect"]

DEFECTS: tuple[str, ...] = (
    "truncated",
    "not_nifti",
    "missing_modality",
    "three_channels",
    "nan",
    "affine_mismatch",
    "bad_label_values",
    "all_zero",
    "smaller_than_roi",
    "non_ras",
    "anisotropic",
)
#: Defects the bundles must handle rather than reject.
BENIGN_DEFECTS: tuple[str, ...] = ("smaller_than_roi", "non_ras", "anisotropic")
#: Defects that make a case unusable.
FATAL_DEFECTS: tuple[str, ...] = tuple(d for d in DEFECTS if d not in BENIGN_DEFECTS)

_NEEDS_LABEL = ("bad_label_values",)
_NON_RAS = (("L", "P", "S"), ("P", "L", "S"), ("A", "S", "R"))
_ZEROED_CHANNEL = 2  # of a 4D image: T1gd in the MSD order FLAIR, T1w, T1gd, T2w
_HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def applicable_defects(layout: str) -> tuple[str, ...]:
    """The defects of :data:`DEFECTS` that exist in ``layout``.

    ``missing_modality`` needs a case that outlives its image file (not when the image is the case:
    ``image_defines_case``, a MosMed study); ``bad_label_values`` needs labels (not ``adni_pairs``).
    """
    spec = get_layout(layout)
    excluded = {"missing_modality"} if spec.image_defines_case else set()
    excluded |= set() if spec.has_labels else {"bad_label_values"}
    return tuple(d for d in DEFECTS if d not in excluded)


def _bad_label_value(spec: DatasetLayout) -> int:
    """The smallest label value outside the layout's convention (BraTS 2021: 3, BraTS 2023 and MSD: 4, binary: 2)."""
    allowed = set(get_label_convention(spec.label_convention).values if spec.label_convention else (0, 1))
    return min(set(range(max(allowed) + 2)) - allowed)


def _needs_label(defect: str, images: list[str]) -> bool:
    """Whether ``defect`` damages the label: ``bad_label_values``, and ``affine_mismatch`` for a case with one
    image file (MSD, MosMed), whose label is then the file moved off the grid."""
    return defect in _NEEDS_LABEL or (defect == "affine_mismatch" and len(images) == 1)


def _paths(item: dict[str, Any], data_dir: str, key: str) -> list[str]:
    value = item.get(key, [])
    return [os.path.join(data_dir, *p.split("/")) for p in (value if isinstance(value, list) else [value])]


def _case_files(spec: DatasetLayout, data_dir: str, item: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(images, labels) of a case; labels include the layout's synthetic-only truth (MosMed) when it exists."""
    images = [path for key in spec.image_keys for path in _paths(item, data_dir, key)]
    labels = _paths(item, data_dir, "label")
    if spec.synthetic_truth is not None:
        truth = os.path.join(data_dir, *spec.synthetic_truth.format(case=item["case"]).split("/"))
        labels += [truth] if os.path.isfile(truth) else []
    return images, labels


def _find_case(spec: DatasetLayout, data_dir: str, case: str) -> dict[str, Any]:
    items = scan_layout(spec, data_dir).items
    for item in items:
        names = {item["case"]} | (
            {item["subject"], f"{item['subject']}/{item['case']}"} if "subject" in item else set()
        )
        if case in names:
            return item
    found = sorted(item.get("subject", item["case"]) for item in items)
    raise ValueError(f"case {case!r} not found complete in {data_dir} ({spec.name}); complete cases: {found}")


def eligible_cases(layout: str, data_dir: str, defect: str) -> list[str]:
    """The cases of ``data_dir`` that :func:`plant_defect` accepts for ``defect`` (those with a label for
    ``bad_label_values``, and for ``affine_mismatch`` when the case has one image file (MSD, MosMed), where the
    label is moved)."""
    spec = _check(layout, defect)
    items = scan_layout(spec, data_dir).items
    return [
        it.get("subject", it["case"])
        for it in items
        if "label" in it or not _needs_label(defect, _case_files(spec, data_dir, it)[0])
    ]


def _check(layout: str, defect: str) -> DatasetLayout:
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; expected one of {', '.join(DEFECTS)}")
    if defect not in applicable_defects(layout):
        raise ValueError(f"defect {defect!r} does not apply to layout {layout!r}")
    return get_layout(layout)


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _resample(path: str, shape: Sequence[int], is_label: bool) -> None:
    """Resample a file to the spatial ``shape`` over the same field of view (voxel edges aligned)."""
    data, affine = _load(path)
    old = np.asarray(data.shape[:3], dtype=np.float64)
    factors = np.asarray(shape, dtype=np.float64) / old
    zoom = [*factors, *([1.0] * (data.ndim - 3))]
    out = ndimage.zoom(data.astype(np.float32), zoom, order=0 if is_label else 1, grid_mode=True, mode="nearest")
    if np.issubdtype(data.dtype, np.integer):
        out = np.rint(out)
    step = old / np.asarray(out.shape[:3], dtype=np.float64)  # old voxels per new voxel, along each axis
    to_old = np.diag([*step, 1.0])
    to_old[:3, 3] = (step - 1.0) / 2.0  # centre of new voxel i lies at old index (i + 0.5) * step - 0.5
    write_nifti(path, out.astype(data.dtype), affine @ to_old)


def _reorient(path: str, codes: tuple[str, str, str]) -> None:
    img = nib.load(path)
    current = nib.orientations.io_orientation(img.affine)
    target = nib.orientations.axcodes2ornt(codes)
    moved = img.as_reoriented(nib.orientations.ornt_transform(current, target))
    data = np.asanyarray(moved.dataobj)
    write_nifti(path, np.ascontiguousarray(data), np.asarray(moved.affine, dtype=np.float64))


def _shrunk_shape(shape: Sequence[int], min_size: Sequence[int] | None) -> tuple[int, int, int]:
    limit = list(shape[:3]) if min_size is None else [int(m) for m in min_size]
    if len(limit) != 3 or min(limit) < 3:
        raise ValueError(f"min_size must be 3 integers >= 3, got {min_size!r}")
    return tuple(max(2, min(m - 1, s // 2)) for s, m in zip(shape[:3], limit))  # type: ignore[return-value]


def plant_defect(
    layout: str,
    data_dir: str,
    case: str,
    defect: str,
    seed: int = 0,
    min_size: Sequence[int] | None = None,
) -> list[str]:
    """Damage one case of a synthetic dataset in place with ``defect`` (see the module docstring).

    Args:
        layout: the dataset's layout (a registered name, see :func:`~common.data.layouts.layout_names`).
        data_dir: a folder written by ``write_synthetic_dataset(layout, data_dir, ...)``.
        case: a case id as ``write_synthetic_dataset`` returns them (BraTS case folder, MSD ``BRATS_XXX``, MosMed
            ``study_XXXX``, ADNI subject; an ADNI image id also works).
        defect: one of :func:`applicable_defects` of ``layout``.
        seed: picks the BraTS modality that is damaged, the NaN voxels and the ``non_ras`` orientation.
        min_size: ``smaller_than_roi`` makes every axis smaller than this (e.g. the training ROI); default: half
            the case's grid.

    Returns:
        the paths written or removed.

    Raises:
        ValueError: unknown or inapplicable defect, unknown case, or a case without the label the defect needs
            (:func:`eligible_cases` lists the cases that work).
    """
    spec = _check(layout, defect)
    data_dir = os.fspath(data_dir)
    item = _find_case(spec, data_dir, case)
    images, labels = _case_files(spec, data_dir, item)
    rng = np.random.default_rng(seed)
    # the file a one-file defect damages: a seed-chosen modality file (BraTS), else the last image (ADNI: the PET)
    target = images[int(rng.integers(len(images)))] if spec.image_files is not None else images[-1]
    if defect in BENIGN_DEFECTS:
        everything = [(p, False) for p in images] + [(p, True) for p in labels]
        if defect == "non_ras":
            current = nib.aff2axcodes(_load(images[0])[1])
            choices = [c for c in _NON_RAS if c != current]  # the synthetic MosMed CT is LPS already
            for path, _ in everything:
                _reorient(path, choices[seed % len(choices)])
            return [p for p, _ in everything]
        shape = _load(images[0])[0].shape[:3]
        if defect == "smaller_than_roi":
            new_shape = _shrunk_shape(shape, min_size)
        else:
            new_shape = (shape[0], shape[1], max(2, round(shape[2] / 3)))
        for path, is_label in everything:
            _resample(path, new_shape, is_label)
        return [p for p, _ in everything]
    if _needs_label(defect, images):
        if "label" not in item:
            raise ValueError(f"case {case!r} has no label; {defect} needs one (eligible_cases lists those that do)")
        if defect == "affine_mismatch":
            target = _paths(item, data_dir, "label")[0]
    if defect == "truncated":
        with open(target, "rb") as f:
            raw = f.read()
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            f.write(raw[: len(raw) // 2])
    elif defect == "not_nifti":
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            f.write(_HTML)
    elif defect == "missing_modality":
        os.remove(target)
    elif defect == "three_channels":
        data, affine = _load(target)
        data = data[..., :3] if data.ndim == 4 else np.stack([data] * 3, axis=-1)
        write_nifti(target, data, affine)
    elif defect == "nan":
        data, affine = _load(target)
        data = data.astype(np.float32)
        voxels = rng.choice(data.size, size=min(5, data.size), replace=False)
        data[np.unravel_index(voxels, data.shape)] = np.nan
        write_nifti(target, data, affine)
    elif defect == "affine_mismatch":
        data, affine = _load(target)
        shifted = affine.copy()
        shifted[:3, 3] += affine[:3, 0]  # one voxel along the first axis
        write_nifti(target, data, shifted)
    elif defect == "bad_label_values":
        target = _paths(item, data_dir, "label")[0]
        data, affine = _load(target)
        data = data.copy()
        data[tuple(int(s) // 2 for s in data.shape[:3])] = _bad_label_value(spec)
        write_nifti(target, data, affine)
    else:  # all_zero
        data, affine = _load(target)
        data = np.array(data)
        if data.ndim == 4:
            data[..., _ZEROED_CHANNEL] = 0
        else:
            data[...] = 0
        write_nifti(target, data, affine)
    return [target]
