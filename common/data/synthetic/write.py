"""Write synthetic phantoms in the real public dataset layouts, one file at a time through ``atomic_path``.

Layouts (folder structure, names and label values as in the real releases):

- ``brats2021``: ``DIR/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 0/1/2/4.
- ``brats2023``: ``DIR/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, labels 0/1/2/3.
- ``msd_task01``: ``DIR/dataset.json``, ``DIR/imagesTr/BRATS_001.nii.gz`` (4D: FLAIR, T1w, T1gd, T2w),
  ``DIR/labelsTr/BRATS_001.nii.gz`` (1 edema, 2 non-enhancing tumour, 3 enhancing), ``DIR/imagesTs/``.
- ``mosmed``: ``DIR/studies/CT-{0..4}/study_XXXX.nii.gz`` and ``DIR/masks/study_XXXX_mask.nii.gz`` (part of
  CT-1), plus the synthetic-only ``DIR/synthetic_truth/study_XXXX_mask.nii.gz`` (every lesioned study).
- ``adni_pairs``: ``DIR/<subject>/<image_id>_{mri,FDG}_MNI152.nii.gz``, plus the synthetic-only
  ``DIR/synthetic_truth.json`` (which subjects have hypometabolism).

Images are float32 (int16 HU for CT), labels uint8; every NIfTI has qform and sform (code 1) and reads with both
nibabel and ITK. Case ``k`` is generated from ``numpy.random.default_rng([seed, k])``: a case does not depend on
how many cases are written, and ``brats2021``/``brats2023``/``msd_task01`` with one seed hold the same phantoms.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from common.data.synthetic.brain import check_shape, make_brain_case
from common.data.synthetic.chest_ct import make_chest_ct_case
from common.data.synthetic.mri_pet import make_mri_pet_case
from common.io import atomic_path

__all__ = [
    "DEFAULT_SHAPES",
    "LAYOUTS",
    "check_synthetic_arguments",
    "mosmed_category_counts",
    "parse_shape",
    "write_adni_pairs",
    "write_brats2021",
    "write_brats2023",
    "write_msd_task01",
    "write_mosmed",
    "write_nifti",
    "write_synthetic_dataset",
]

LAYOUTS = ("brats2021", "brats2023", "msd_task01", "mosmed", "adni_pairs")
#: default grid (x, y, z) per layout: the real BraTS/MSD size, a reduced MosMed size, DC2Fusion's 128^3.
DEFAULT_SHAPES: dict[str, tuple[int, int, int]] = {
    "brats2021": (240, 240, 155),
    "brats2023": (240, 240, 155),
    "msd_task01": (240, 240, 155),
    "mosmed": (128, 128, 32),
    "adni_pairs": (128, 128, 128),
}

#: BraTS 2021 labels (1 necrotic core, 2 edema, 4 enhancing) -> BraTS 2023 and MSD Task01 values.
_TO_BRATS2023 = {0: 0, 1: 1, 2: 2, 4: 3}
_TO_MSD = {0: 0, 1: 2, 2: 1, 4: 3}
_MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")
_BRATS2023_FILES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def parse_shape(shape: str | Sequence[int] | None) -> tuple[int, int, int] | None:
    """``"64,64,48"``, ``"64x64x48"``, ``[64, 64, 48]`` -> ``(64, 64, 48)``; ``None`` stays ``None``."""
    if shape is None:
        return None
    if isinstance(shape, str):
        parts = [p for p in shape.replace("x", ",").replace(" ", ",").strip("()[]").split(",") if p]
        try:
            shape = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"shape must be 3 positive integers like '64,64,48', got {shape!r}") from None
    return check_shape(shape)


def check_synthetic_arguments(
    layout: str, output_dir: str | os.PathLike, num_cases: int, shape: str | Sequence[int] | None, seed: int
) -> tuple[int, int, int]:
    """Validate the arguments of :func:`write_synthetic_dataset`; return the grid to use.

    Raises:
        ValueError: naming the bad argument (an unknown layout lists the valid ones).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if not isinstance(output_dir, (str, os.PathLike)) or not os.fspath(output_dir):
        raise ValueError(f"output_dir must be a folder path, got {output_dir!r}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {os.fspath(output_dir)!r} exists and is not a folder")
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    parsed = parse_shape(shape)
    return DEFAULT_SHAPES[layout] if parsed is None else parsed


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (3D, or 4D channels-last) as NIfTI-1, qform = sform = ``affine`` (code 1), atomically."""
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def _progress(items: Iterable, total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(items, total=total, desc=desc, unit="case", disable=not progress, dynamic_ncols=True)


def _relabel(seg: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for old, new in mapping.items():
        lut[old] = new
    return lut[seg]


def _brain_cases(
    layout: str, case_ids: Sequence[str], shape: tuple[int, int, int], seed: int, progress: bool, first: int = 0
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Brain phantoms ``make_brain_case(shape, default_rng([seed, index]))`` with a progress bar."""
    bar = _progress(enumerate(case_ids, start=first), len(case_ids), layout, progress)
    for index, case_id in bar:
        bar.set_postfix_str(case_id)
        yield case_id, make_brain_case(shape, np.random.default_rng([seed, index]))


def write_brats2021(
    output_dir: str, num_cases: int = 4, shape: Sequence[int] = (240, 240, 155), seed: int = 0, progress: bool = True
) -> list[str]:
    """BraTS 2021 layout: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 0/1/2/4."""
    case_ids = [f"BraTS2021_{i:05d}" for i in range(num_cases)]
    for case_id, case in _brain_cases("brats2021", case_ids, check_shape(shape), seed, progress):
        folder = os.path.join(output_dir, case_id)
        for name in ("t1", "t1ce", "t2", "flair", "seg"):
            write_nifti(os.path.join(folder, f"{case_id}_{name}.nii.gz"), case[name], case["affine"])
    return case_ids


def write_brats2023(
    output_dir: str, num_cases: int = 4, shape: Sequence[int] = (240, 240, 155), seed: int = 0, progress: bool = True
) -> list[str]:
    """BraTS 2023 glioma layout: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

    Labels 0/1/2/3 (3 = enhancing tumour).
    """
    case_ids = [f"BraTS-GLI-{i:05d}-000" for i in range(num_cases)]
    for case_id, case in _brain_cases("brats2023", case_ids, check_shape(shape), seed, progress):
        folder = os.path.join(output_dir, case_id)
        for name, suffix in _BRATS2023_FILES.items():
            write_nifti(os.path.join(folder, f"{case_id}-{suffix}.nii.gz"), case[name], case["affine"])
        write_nifti(os.path.join(folder, f"{case_id}-seg.nii.gz"), _relabel(case["seg"], _TO_BRATS2023), case["affine"])
    return case_ids


def write_msd_task01(
    output_dir: str,
    num_cases: int = 4,
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    progress: bool = True,
    num_test: int | None = None,
) -> list[str]:
    """Medical Segmentation Decathlon Task01_BrainTumour layout.

    ``imagesTr/BRATS_001.nii.gz`` is one 4D NIfTI (X, Y, Z, 4) with channels FLAIR, T1w, T1gd, T2w;
    ``labelsTr/BRATS_001.nii.gz`` has 0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour; test
    cases (``imagesTs``, no label) continue the numbering, as in the Decathlon; ``dataset.json`` lists them all.

    Args:
        num_cases: training cases.
        num_test: test cases, default ``max(1, num_cases // 4)``.

    Returns:
        the training ids, then the test ids (``BRATS_001``, ...).
    """
    num_test = max(1, num_cases // 4) if num_test is None else int(num_test)
    if num_test < 0:
        raise ValueError(f"num_test must be >= 0, got {num_test}")
    train_ids = [f"BRATS_{i:03d}" for i in range(1, num_cases + 1)]
    test_ids = [f"BRATS_{i:03d}" for i in range(num_cases + 1, num_cases + num_test + 1)]
    for index, (case_id, case) in enumerate(
        _brain_cases("msd_task01", train_ids + test_ids, check_shape(shape), seed, progress)
    ):
        image = np.stack([case[name] for name in _MSD_CHANNELS], axis=-1)
        is_training = index < num_cases
        folder = "imagesTr" if is_training else "imagesTs"
        write_nifti(os.path.join(output_dir, folder, f"{case_id}.nii.gz"), image, case["affine"])
        if is_training:
            seg = _relabel(case["seg"], _TO_MSD)
            write_nifti(os.path.join(output_dir, "labelsTr", f"{case_id}.nii.gz"), seg, case["affine"])
    dataset = {
        "name": "BRATS",
        "description": "Synthetic gliomas (necrotic core, enhancing tumour, edema) on MNI152 anatomy; "
        "common.data.synthetic phantoms, not patient data",
        "reference": "synthetic (common.data.synthetic.write)",
        "licence": "synthetic data, no restrictions",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": num_cases,
        "numTest": num_test,
        "training": [
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"} for case_id in train_ids
        ],
        "test": [f"./imagesTs/{case_id}.nii.gz" for case_id in test_ids],
    }
    os.makedirs(output_dir, exist_ok=True)
    with atomic_path(os.path.join(output_dir, "dataset.json")) as tmp, open(tmp, "w") as handle:
        json.dump(dataset, handle, indent=4)
    return train_ids + test_ids


def mosmed_category_counts(num_cases: int) -> dict[int, int]:
    """Default studies per category: CT-0 ``n // 3``, CT-2 ``n // 10``, CT-3 ``n // 20``, CT-4 ``n // 40``.

    CT-1 gets the rest, so CT-2 appears from 10 studies, CT-3 from 20, CT-4 from 40, and CT-1 always holds
    about half (as in COVID19_1110, where CT-1 is the largest category).
    """
    counts = {0: num_cases // 3, 2: num_cases // 10, 3: num_cases // 20, 4: num_cases // 40}
    counts[1] = num_cases - sum(counts.values())
    return dict(sorted(counts.items()))


def write_mosmed(
    output_dir: str,
    num_cases: int = 4,
    shape: Sequence[int] = (128, 128, 32),
    seed: int = 0,
    progress: bool = True,
    category_counts: dict[int, int] | None = None,
    mask_fraction: float = 0.5,
    **phantom: Any,
) -> list[str]:
    """MosMedData COVID19_1110 layout.

    Studies are numbered ``study_0001``, ... across the categories in order CT-0, CT-1, ..., CT-4
    (``studies/CT-k/study_XXXX.nii.gz``, int16 HU). Lesion masks (``masks/study_XXXX_mask.nii.gz``, uint8) exist,
    as in the real release, only for the first ``max(1, int(mask_fraction * n_CT1))`` CT-1 studies.
    Synthetic-only extra: ``synthetic_truth/study_XXXX_mask.nii.gz`` holds the true lesion mask of every lesioned
    study (CT-1..CT-4), for evaluating unsupervised pseudo-masks; it has no counterpart in the real data.

    Args:
        num_cases: total studies, split by :func:`mosmed_category_counts` unless ``category_counts`` is given.
        category_counts: studies per category, e.g. ``{0: 2, 1: 4, 2: 1}`` (overrides ``num_cases``).
        mask_fraction: fraction of CT-1 studies with a released mask, in [0, 1].
        phantom: options of :func:`~common.data.synthetic.chest_ct.make_chest_ct_case` (``pleural_lesions``,
            ``hu_overlap``).

    Returns:
        the study ids, ``study_0001``, ...
    """
    counts = mosmed_category_counts(num_cases) if category_counts is None else dict(category_counts)
    for category, count in counts.items():
        if category not in range(5) or isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"category_counts must map categories 0..4 to counts >= 0, got {category_counts!r}")
    if not 0 <= mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in [0, 1], got {mask_fraction}")
    shape = check_shape(shape)
    plan = [category for category in sorted(counts) for _ in range(counts[category])]
    n_masks = max(1, int(mask_fraction * counts.get(1, 0))) if mask_fraction > 0 and counts.get(1, 0) else 0
    study_ids, masks_written = [], 0
    bar = _progress(enumerate(plan, start=1), len(plan), "mosmed", progress)
    for number, category in bar:
        study_id = f"study_{number:04d}"
        bar.set_postfix_str(f"CT-{category}/{study_id}")
        case = make_chest_ct_case(shape, np.random.default_rng([seed, number]), category, **phantom)
        affine = case["affine"]
        write_nifti(os.path.join(output_dir, "studies", f"CT-{category}", f"{study_id}.nii.gz"), case["image"], affine)
        if category > 0:
            truth = os.path.join(output_dir, "synthetic_truth", f"{study_id}_mask.nii.gz")
            write_nifti(truth, case["lesion"], affine)
        if category == 1 and masks_written < n_masks:
            write_nifti(os.path.join(output_dir, "masks", f"{study_id}_mask.nii.gz"), case["lesion"], affine)
            masks_written += 1
        study_ids.append(study_id)
    return study_ids


def _adni_identifiers(seed: int, count: int) -> list[tuple[str, str]]:
    """ADNI-like ``(subject, image_id)`` pairs, e.g. ``("002_S_0295", "I45108")``: unique, stable prefixes per seed."""
    identifiers: list[tuple[str, str]] = []
    subjects, images = set(), set()
    for index in range(count):
        rng = np.random.default_rng([seed, index, 1])
        while True:
            subject = f"{int(rng.integers(2, 942)):03d}_S_{int(rng.integers(1, 10000)):04d}"
            image_id = f"I{int(rng.integers(10000, 1000000))}"
            if subject not in subjects and image_id not in images:
                break
        subjects.add(subject)
        images.add(image_id)
        identifiers.append((subject, image_id))
    return identifiers


def write_adni_pairs(
    output_dir: str, num_cases: int = 4, shape: Sequence[int] = (128, 128, 128), seed: int = 0, progress: bool = True
) -> list[str]:
    """ADNI MRI-PET pairs in MNI152 space: ``<subject>/<image_id>_mri_MNI152.nii.gz`` and ``..._FDG_MNI152.nii.gz``.

    Every third subject (from a seed-dependent offset) has regional hypometabolism. Synthetic-only extra:
    ``synthetic_truth.json`` records, per subject, the image id, whether it has hypometabolism and where.

    Returns:
        the subject ids, e.g. ``["002_S_0295", ...]``.
    """
    shape = check_shape(shape)
    offset = int(np.random.default_rng([seed, 2]).integers(3))
    truth = []
    identifiers = _adni_identifiers(seed, num_cases)
    bar = _progress(enumerate(identifiers), num_cases, "adni_pairs", progress)
    for index, (subject, image_id) in bar:
        bar.set_postfix_str(subject)
        hypometabolic = (index + offset) % 3 == 0
        case = make_mri_pet_case(shape, np.random.default_rng([seed, index]), hypometabolism=hypometabolic)
        folder = os.path.join(output_dir, subject)
        write_nifti(os.path.join(folder, f"{image_id}_mri_MNI152.nii.gz"), case["mri"], case["affine"])
        write_nifti(os.path.join(folder, f"{image_id}_FDG_MNI152.nii.gz"), case["pet"], case["affine"])
        truth.append(
            {
                "subject": subject,
                "image_id": image_id,
                "hypometabolism": hypometabolic,
                "region": str(case["region"]) or None,
            }
        )
    record = {
        "note": "synthetic-only extra (no counterpart in ADNI): ground truth of common.data.synthetic phantoms",
        "hypometabolic_subjects": [item["subject"] for item in truth if item["hypometabolism"]],
        "subjects": truth,
    }
    os.makedirs(output_dir, exist_ok=True)
    with atomic_path(os.path.join(output_dir, "synthetic_truth.json")) as tmp, open(tmp, "w") as handle:
        json.dump(record, handle, indent=2)
    return [subject for subject, _ in identifiers]


_WRITERS = {
    "brats2021": write_brats2021,
    "brats2023": write_brats2023,
    "msd_task01": write_msd_task01,
    "mosmed": write_mosmed,
    "adni_pairs": write_adni_pairs,
}


def write_synthetic_dataset(
    layout: str,
    output_dir: str,
    num_cases: int = 4,
    shape: Sequence[int] | str | None = None,
    seed: int = 0,
    progress: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Write ``num_cases`` synthetic cases to ``output_dir`` in a real public layout (see the module docstring).

    Args:
        layout: one of :data:`LAYOUTS`.
        output_dir: destination folder (created; existing files of the same names are replaced).
        num_cases: cases to write (``msd_task01`` adds ``max(1, num_cases // 4)`` test cases; ``mosmed`` splits
            them over CT-0..CT-4 with :func:`mosmed_category_counts`).
        shape: grid (x, y, z), each >= 16, or a string ``"64,64,48"``; default :data:`DEFAULT_SHAPES`
            (240 x 240 x 155 for BraTS/MSD, 128 x 128 x 32 for MosMed, 128^3 for ADNI).
        seed: the dataset is a deterministic function of it.
        progress: show a tqdm bar with the current case.
        kwargs: passed to the layout's writer (e.g. ``mosmed``'s phantom options, see :func:`write_mosmed`).

    Returns:
        the case ids (BraTS case folders, MSD ``BRATS_XXX`` training then test, MosMed ``study_XXXX``, ADNI
        subjects).

    Raises:
        ValueError: on a bad argument, naming it.
    """
    grid = check_synthetic_arguments(layout, output_dir, num_cases, shape, seed)
    return _WRITERS[layout](os.fspath(output_dir), int(num_cases), grid, int(seed), progress, **kwargs)
