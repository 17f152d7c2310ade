"""Dataset integrity: does a folder (or a datalist) hold what a bundle needs, file by file, in one pass?

A user brings a dataset in one of the public layouts (:mod:`common.data.layouts`: the folder trees, and the rules
checked below, one definition per layout). Before hours of training, :func:`verify_dataset` scans the folder and reads every file of every case, and
returns **every** problem it finds as a :class:`Problem` naming the case, the file and what is wrong, so that a
user can fix the whole dataset in one go (``tools/verify_dataset.py`` is its command line). Checked:

- layout: every expected file of a case is present (BraTS: the four modalities; MSD: the files listed in
  ``dataset.json``; ADNI: both files of a pair), no study or image id is in two places, no mask lacks its study,
  and no stray file sits in the layout's folders (a misnamed modality, an unlisted MSD image, a ``.nii`` copy);
- files: each one is a NIfTI (a text or HTML page saved as ``.nii.gz`` is "not a NIfTI file"), is complete
  (truncated gzip data), has the expected dimensionality (3D; MSD: 4D with 4 channels, so a 3D file and a
  3-channel file are both named as such), a non-degenerate affine, and no NaN or infinite value;
- a case: all its files (modalities, MRI and PET, image and label) share one voxel grid - spatial shape, and
  affine (spacing, origin and direction) to within ``atol`` mm; a file off the grid shared by most of the case
  is the one named;
- values: label values within the layout's convention (:mod:`common.data.labels`; MosMed masks binary); no
  image, or MSD channel, is constant (an all-zero volume is a problem); by the layout's value rule, CT is in
  Hounsfield units (a chest CT holds air, so its lowest value is below -500 HU) and MRI and PET are non-negative
  (allowing interpolation ringing down to -5 % of the largest magnitude).

Not problems (the bundles handle them): a grid smaller than a training ROI (not checked: the ROI is a bundle
setting), an orientation other than RAS and anisotropic voxels (one DEBUG line per case, logger
``"common.data.integrity"``).

The same scan and case check serve :func:`common.data.datalist.build_datalist` (``thorough=False``: without
the content sniffing and the value checks, which it never made), :func:`require_valid_datalist` (called by training configs before the first epoch) and
:func:`screen_items` (inference: bad cases are skipped with a warning instead of stopping the run).

nnU-Net's ``verify_dataset_integrity`` was the model; beyond it, every problem is collected instead of the
first one raised, files are sniffed before they are parsed, and value plausibility is checked.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.data.decathlon import datalist_info, load_datalist
from common.data.labels import check_binary_mask, check_label_values
from common.data.layouts import (
    DATASET,
    HOUNSFIELD,
    LAYOUTS,
    NON_NEGATIVE,
    DatasetLayout,
    LayoutScan,
    Problem,
    find_layout,
    get_layout,
    layout_names,
)
from common.data.layouts.base import NII
from common.data.layouts.msd_task01 import CHANNEL_ORDER as MSD_CHANNEL_ORDER
from common.data.nifti import check_same_grid, load_nifti
from common.errors import DataError
from common.io import atomic_path

__all__ = [
    "DATASET",
    "LAYOUTS",
    "MSD_CHANNEL_ORDER",
    "IntegrityReport",
    "LayoutScan",
    "Problem",
    "check_item",
    "check_items",
    "dataset_report",
    "require_valid_datalist",
    "scan_layout",
    "screen_items",
    "verify_datalist",
    "verify_dataset",
]

logger = logging.getLogger(__name__)

#: Lowest value a chest CT in Hounsfield units must reach somewhere (air is about -1000 HU).
CT_AIR_HU = -500.0
#: Negative MRI/PET values are accepted down to this fraction of the largest magnitude (interpolation ringing).
NEGATIVE_TOLERANCE = 0.05
#: Largest to smallest voxel spacing ratio above which a case is noted (at INFO level) as anisotropic.
ANISOTROPY_NOTE = 2.0

_NIFTI_HEADER_SIZES = (348, 540)  # sizeof_hdr of NIfTI-1 and NIfTI-2


@dataclass
class IntegrityReport:
    """The result of :func:`dataset_report`: how many cases were checked and every problem found."""

    layout: str
    data_dir: str
    num_cases: int
    problems: list[Problem]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"layout", "data_dir", "num_cases", "num_problems", "problems": [{case, path, problem}]}``."""
        return {
            "layout": self.layout,
            "data_dir": self.data_dir,
            "num_cases": self.num_cases,
            "num_problems": len(self.problems),
            "problems": [asdict(p) for p in self.problems],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as indented JSON, atomically."""
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


# ----------------------------------------------------------------------------------------------- scanning


def scan_layout(layout: str | DatasetLayout, data_dir: str | os.PathLike) -> LayoutScan:
    """Find every case of ``data_dir`` in ``layout`` without reading the images (file names only): the layout's
    scanner (``DatasetLayout.scan``).

    Raises:
        ValueError: unknown layout.
        DataError: the folder does not exist, or cannot be in the layout at all (MSD without a readable
            ``dataset.json``, MosMed without ``studies/``).
    """
    spec = get_layout(layout)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(data_dir, "data folder not found")
    return spec.scan(data_dir)


# ----------------------------------------------------------------------------------------------- files


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    return any(struct.unpack(f"{order}i", head[:4])[0] in _NIFTI_HEADER_SIZES for order in "<>")


def _sniff(path: str) -> str | None:
    """Say what is wrong if ``path`` is plainly no NIfTI file (a web page, a PNG, plain text), else ``None``.

    nibabel's own errors for such files ("Not a gzipped file") do not tell a user that the file simply is not
    an image; damaged NIfTI files are left to :func:`~common.data.nifti.load_nifti`, which names truncation.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError:
        return None  # missing or unreadable: load_nifti names it
    gzipped = head[:2] == b"\x1f\x8b"
    if gzipped:
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(352)
        except (OSError, EOFError, zlib.error):
            return None  # damaged gzip data: load_nifti names the truncation
        if not _is_nifti_header(inner):  # the whole stream was read, or its first 352 bytes: no NIfTI header
            return f"not a NIfTI file (gzip-compressed data starting with {inner[:16]!r})"
        return None
    if _is_nifti_header(head):
        return f"an uncompressed NIfTI file named {NII} (gzip it or rename it .nii)" if path.endswith(".gz") else None
    return f"not a NIfTI file (starts with {head[:16]!r})"


def _value_problems(data: np.ndarray, rule: str, channel_names: Sequence[str] | None) -> list[str]:
    """Plausibility of an image's values: not constant, and the layout's ``rule``: CT in HU (:data:`HOUNSFIELD`),
    MRI/PET non-negative (:data:`NON_NEGATIVE`); see the module docstring."""
    problems = []
    channels = [data[..., c] for c in range(data.shape[-1])] if data.ndim == 4 else [data]
    for c, volume in enumerate(channels):
        prefix = f"channel {c} ({channel_names[c]}): " if channel_names is not None and data.ndim == 4 else ""
        low, high = float(volume.min()), float(volume.max())
        if low == high:
            problems.append(
                prefix + ("all zero (empty image)" if low == 0 else f"constant image (every voxel {low:g})")
            )
        elif rule == HOUNSFIELD and low > CT_AIR_HU:
            problems.append(
                f"{prefix}not in Hounsfield units: lowest value {low:g} > {CT_AIR_HU:g} (a chest CT holds air at "
                "about -1000 HU; was it rescaled, or the DICOM rescale intercept not applied?)"
            )
        elif rule == NON_NEGATIVE and low < -NEGATIVE_TOLERANCE * max(abs(low), abs(high)):
            problems.append(f"{prefix}negative intensities down to {low:g} (MRI and PET are non-negative; normalised?)")
    return problems


def _notes(affine: np.ndarray) -> list[str]:
    """Benign facts about a grid (orientation other than RAS, anisotropic voxels), for a DEBUG line."""
    notes = []
    codes = "".join(nib.aff2axcodes(affine))
    if codes != "RAS":
        notes.append(f"orientation {codes} (not RAS)")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if spacing.min() > 0 and spacing.max() / spacing.min() > ANISOTROPY_NOTE:
        notes.append("anisotropic voxels " + "x".join(f"{s:.3g}" for s in spacing) + " mm")
    return notes


# ----------------------------------------------------------------------------------------------- cases


def _case_name(item: Mapping[str, Any], files: Sequence[str]) -> str:
    case = item.get("case")
    if case is None:
        case = os.path.basename(files[0]).removesuffix(NII) if files else "<item>"
    return f"{item['subject']}/{case}" if item.get("subject") else str(case)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _grid_problems(case: str, paths: list[str], atol: float) -> list[Problem]:
    """Files of a case off the grid shared by most of its files (the first file wins ties)."""
    if len(paths) < 2:
        return []
    try:
        check_same_grid(paths, atol=atol)
        return []
    except DataError:
        pass

    def agree(a: str, b: str) -> bool:
        try:
            check_same_grid([a, b], atol=atol)
            return True
        except DataError:
            return False

    votes = [sum(agree(a, b) for b in paths) for a in paths]
    reference = paths[votes.index(max(votes))]
    problems = []
    for path in paths:
        try:
            check_same_grid([reference, path], atol=atol)
        except DataError as err:
            problems.append(Problem(case, err.path, err.problem))
    return problems


def check_item(
    item: Mapping[str, Any],
    layout: str | DatasetLayout,
    base_dir: str | None = None,
    *,
    thorough: bool = True,
    atol: float = 1e-3,
) -> list[Problem]:
    """Read every file of one datalist item and return all its problems (never raises for bad data).

    Args:
        item: a datalist item: the layout's image keys (``image``, a path or a list of paths; ``mri`` and ``pet``
            for ``adni_pairs``) and optionally ``label``; ``case`` (and ``subject``) name it in the problems, else
            the first file's name does.
        layout: a registered layout's name (:func:`~common.data.layouts.layout_names`) or a layout: its image
            keys, the number of modality files, the expected image shape (``channel_order``: 4D with that many
            channels; else 3D), the label convention (none: binary masks) and the intensity rule.
        base_dir: folder that relative paths are joined onto (``None``: paths are used as they are).
        thorough: also sniff each file's content before parsing it (naming a web page or text saved as
            ``.nii.gz`` "not a NIfTI file") and check intensities (constant images, CT in HU, non-negative
            MRI/PET); the read, shape, NaN/Inf, affine, label and grid checks are always made (they are what
            ``build_datalist`` checks).
        atol: tolerance on affine entries, in mm, when comparing the grids of the case's files.

    Returns:
        the problems, in file order; an empty list for a good case.

    Raises:
        ValueError: unknown layout (a programming error, not bad data).
    """
    spec = get_layout(layout)
    images = [path for key in spec.image_keys for path in _as_list(item.get(key))]
    labels = _as_list(item.get("label"))
    join = (lambda p: p) if base_dir is None else (lambda p: os.path.join(os.fspath(base_dir), *p.split("/")))
    case = _case_name(item, images + labels)
    problems = [Problem(case, "<datalist item>", f"no {key!r} path") for key in spec.image_keys if not item.get(key)]
    expected = spec.image_files
    if expected is not None and images and len(images) != expected:
        problems.append(Problem(case, join(images[0]), f"expected {expected} modality files, got {len(images)}"))
    channels = spec.channel_order
    shape = {"ndim": 4, "channels": len(channels)} if channels is not None else {"ndim": 3}
    readable, notes = [], []
    for role, path in [("image", join(p)) for p in images] + [("label", join(p)) for p in labels]:
        sniffed = _sniff(path) if thorough else None
        if sniffed is not None:
            problems.append(Problem(case, path, sniffed))
            continue
        try:
            data, affine, _ = load_nifti(path, **(shape if role == "image" else {"ndim": 3}))
            if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
                raise DataError(path, "degenerate affine (a voxel size of 0, or parallel axes)")
            if role == "label" and spec.label_convention is None:
                check_binary_mask(data, path)
            elif role == "label":
                check_label_values(data, spec.label_convention, path)
            elif thorough:
                problems += [Problem(case, path, p) for p in _value_problems(data, spec.value_rule, channels)]
            if not notes:
                notes = _notes(affine)
        except DataError as err:
            problems.append(Problem(case, err.path, err.problem))
            continue
        readable.append(path)
    problems += _grid_problems(case, readable, atol)
    if notes:
        logger.debug("%s: note: %s (not a problem: the bundles reorient and resample)", case, ", ".join(notes))
    return problems


def check_items(
    items: Sequence[Mapping[str, Any]],
    layout: str | DatasetLayout,
    base_dir: str | None = None,
    *,
    thorough: bool = True,
    atol: float = 1e-3,
    num_workers: int | None = None,
    progress: bool = True,
) -> list[list[Problem]]:
    """:func:`check_item` for many items in a thread pool (decompression releases the GIL); one list per item.

    Args:
        num_workers: threads; ``None``: up to 8, at most the CPU count.
        progress: show a tqdm bar on stderr while checking (only on a terminal; cleared when done).
    """
    spec = get_layout(layout)
    workers = max(1, min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers))
    with ThreadPoolExecutor(workers) as pool:
        results: Iterable[list[Problem]] = pool.map(
            lambda it: check_item(it, spec, base_dir, thorough=thorough, atol=atol), items
        )
        if progress:  # disable=None: a bar only on a terminal
            results = tqdm(
                results,
                total=len(items),
                desc=f"checking {spec.name}",
                unit="case",
                file=sys.stderr,
                leave=False,
                disable=None,
            )
        return list(results)


# ----------------------------------------------------------------------------------------------- datasets


def dataset_report(
    layout: str | DatasetLayout,
    data_dir: str | os.PathLike,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    atol: float = 1e-3,
) -> IntegrityReport:
    """Scan ``data_dir`` in ``layout`` and read every file of every case; count the cases, collect every problem.

    Problems are sorted by case (dataset-level ones first), in file order within a case.

    Raises:
        ValueError: unknown layout.
        DataError: ``data_dir`` is not a folder.
    """
    spec = get_layout(layout)
    data_dir = os.fspath(data_dir)
    try:
        scan = scan_layout(spec, data_dir)
    except DataError as err:
        if not os.path.isdir(data_dir):
            raise
        scan = LayoutScan(problems=[Problem(DATASET, err.path, err.problem)])
    checked = check_items(scan.items, spec, data_dir, num_workers=num_workers, progress=progress, atol=atol)
    problems = scan.problems + scan.stray + [p for found in checked for p in found]
    problems.sort(key=lambda p: (p.case != DATASET, p.case))
    cases = {_case_name(it, []) for it in scan.items} | {p.case for p in scan.problems if p.case != DATASET}
    return IntegrityReport(spec.name, data_dir, len(cases), problems)


def verify_dataset(layout: str | DatasetLayout, data_dir: str) -> list[Problem]:
    """Every problem of a dataset folder in ``layout`` (see the module docstring); ``[]`` when it is clean.

    Raises:
        ValueError: unknown layout.
        DataError: ``data_dir`` is not a folder.
    """
    return dataset_report(layout, data_dir).problems


def verify_datalist(
    data_list_file_path: str, dataset_dir: str, keys: Sequence[str] = ("training", "validation")
) -> list[Problem]:
    """Every problem of the cases listed under ``keys`` of a datalist written by ``tools/prepare_datalist.py``.

    The layout comes from the datalist's ``layout`` field; paths are joined onto ``dataset_dir``.

    Raises:
        DataError: the datalist is unreadable, lacks one of ``keys``, or names no known layout.
    """
    layout = datalist_info(data_list_file_path)["layout"]
    if find_layout(layout) is None:
        known = ", ".join(layout_names())
        problem = f"layout {layout!r} is not one of {known} (write it with tools/prepare_datalist.py)"
        raise DataError(data_list_file_path, problem)
    items = [item for key in keys for item in load_datalist(data_list_file_path, key, dataset_dir)]
    return [p for found in check_items(items, layout) for p in found]


def require_valid_datalist(
    data_list_file_path: str,
    dataset_dir: str,
    keys: Sequence[str] = ("training", "validation"),
    missing_ok: bool = False,
    rank0_only: bool = False,
) -> None:
    """Raise :class:`~common.errors.DataError` listing every problem (one per line) of the datalist's cases.

    Called at the start of training, so that a bad file stops the run before the first epoch, not after hours;
    in a bundle config's ``initialize``: ``"$require_valid_datalist(@data_list_file_path, @dataset_dir)"``.

    Args:
        data_list_file_path: the datalist (``tools/prepare_datalist.py``); paths in it are relative to
            ``dataset_dir``.
        dataset_dir: the dataset folder.
        keys: the lists of the datalist to check.
        missing_ok: when no file is at ``data_list_file_path``, check nothing (MONAI Label trains with the data
            as overrides and no datalist); otherwise a missing datalist is an error.
        rank0_only: check only in the process of global rank 0 (torchrun's ``RANK`` variable, read from the
            environment because the check runs before the process group exists), so that a multi-GPU run reads
            every file once; the other ranks return at once.
    """
    if rank0_only and int(os.environ.get("RANK", "0")) != 0:
        return
    if missing_ok and not os.path.isfile(data_list_file_path):
        return
    problems = verify_datalist(data_list_file_path, dataset_dir, keys)
    if problems:
        lines = "\n".join(str(p) for p in problems)
        raise DataError(data_list_file_path, f"{len(problems)} data problem(s) in {', '.join(keys)}:\n{lines}")


def screen_items(items: list[dict], layout: str, skipped: list[tuple[dict, str]] | None = None) -> list[dict]:
    """For inference: the items whose files are all good; one WARNING per bad case naming its files and problems.

    Paths are used as they are (join them first, e.g. with :func:`common.data.decathlon.load_datalist`). The
    logger is ``"common.data.integrity"``. Each bad item is appended to ``skipped``, when given, with its problems
    in one line (``"<file>: <problem>; ..."``), as :func:`common.data.inference.inference_items` reports them.

    Raises:
        DataError: no item is left (naming the folder holding the items).
    """
    checked = check_items(items, layout, progress=False)
    good = []
    for item, problems in zip(items, checked):
        if problems:
            details = "; ".join(f"{p.path}: {p.problem}" for p in problems)
            logger.warning("skipping case %s: %s", problems[0].case, details)
            if skipped is not None:
                skipped.append((item, details))
        else:
            good.append(item)
    if not good:
        files = [f for it in items for key in get_layout(layout).path_keys for f in _as_list(it.get(key))]
        where = os.path.commonpath([os.path.abspath(f) for f in files]) if files else "<no item>"
        raise DataError(where, f"no usable case: all {len(items)} failed the integrity check (see the warnings)")
    return good
