"""Dataset integrity: does a folder (or a datalist) hold what a bundle needs, file by file, in one pass?

A user brings a dataset in one of the public layouts (see :mod:`common.data.datalist` for the folder trees).
Before hours of training, :func:`verify_dataset` scans the folder and reads every file of every case, and
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
  image, or MSD channel, is constant (an all-zero volume is a problem); CT is in Hounsfield units (a chest CT
  holds air, so its lowest value is below -500 HU); MRI and PET are non-negative (allowing interpolation
  ringing down to -5 % of the largest magnitude).

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
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.data.decathlon import datalist_info, load_datalist
from common.data.labels import BRAIN_MODALITIES, check_binary_mask, check_label_values
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

#: Supported dataset layouts.
LAYOUTS: tuple[str, ...] = ("brats2021", "brats2023", "msd_task01", "mosmed", "adni_pairs")

#: Channel order of the MSD Task01 4D images (``common.data.labels.MSD_TO_STANDARD`` reorders them).
MSD_CHANNEL_ORDER: tuple[str, str, str, str] = ("FLAIR", "T1w", "T1gd", "T2w")

#: The ``case`` of a problem that belongs to no single case (no case found, ``dataset.json``, an orphan mask).
DATASET = "(dataset)"

#: Lowest value a chest CT in Hounsfield units must reach somewhere (air is about -1000 HU).
CT_AIR_HU = -500.0
#: Negative MRI/PET values are accepted down to this fraction of the largest magnitude (interpolation ringing).
NEGATIVE_TOLERANCE = 0.05
#: Largest to smallest voxel spacing ratio above which a case is noted (at INFO level) as anisotropic.
ANISOTROPY_NOTE = 2.0

_NII = ".nii.gz"
_BRATS: dict[str, tuple[re.Pattern[str], str, dict[str, str]]] = {
    # case folder pattern, separator before the file suffix, file suffix of each standard modality
    "brats2021": (re.compile(r"BraTS2021_\d+"), "_", {"t1c": "t1ce", "t1": "t1", "t2": "t2", "flair": "flair"}),
    "brats2023": (
        re.compile(r"BraTS-[A-Za-z]+-\d+-\d+"),
        "-",
        {"t1c": "t1c", "t1": "t1n", "t2": "t2w", "flair": "t2f"},
    ),
}
_MOSMED_CATEGORY = re.compile(r"CT-[0-4]")
_MOSMED_STUDY = re.compile(r"(study_\d+)\.nii\.gz")
_MOSMED_MASK = re.compile(r"(study_\d+)_mask\.nii\.gz")
_ADNI = re.compile(r"(.+)_(mri|FDG)_MNI152\.nii\.gz")
_NIFTI_HEADER_SIZES = (348, 540)  # sizeof_hdr of NIfTI-1 and NIfTI-2


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: the case, the file (or folder) and what is wrong.

    ``str(problem)`` is ``"<case>: <path>: <problem>"``, one line. ``case`` is the case id (``BraTS2021_00003``,
    ``BRATS_002``, ``study_0255``, ``<subject>/<image_id>`` for ADNI pairs) or :data:`DATASET`.
    """

    case: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.case}: {self.path}: {self.problem}"


@dataclass
class LayoutScan:
    """What :func:`scan_layout` found in a folder.

    Attributes:
        items: one datalist item per complete case, paths relative to the folder (POSIX separators). Keys:
            BraTS ``case, image (t1c, t1, t2, flair), [label]``; MSD ``case, image, [label], channel_order``;
            MosMed ``case, image, category, [label]``; ADNI ``case (image id), subject, mri, pet``.
        problems: missing files, duplicates, orphan masks, an empty folder: the case cannot be used.
        stray: files or folders inside the layout's folders that belong to no case (harmless to the bundles,
            reported by :func:`verify_dataset`, ignored by ``build_datalist``).
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stray: list[Problem] = field(default_factory=list)


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


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


# ----------------------------------------------------------------------------------------------- scanning


def _rel(*parts: str) -> str:
    return "/".join(parts)


def _visible(folder: str) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)


def _subdirs(folder: str) -> list[str]:
    return [e.name for e in _visible(folder) if e.is_dir()]


def _strays(case: str, folder: str, expected: Callable[[str], bool], what: str) -> list[Problem]:
    """Entries of ``folder`` (hidden ones aside, e.g. macOS ``._*`` files) for which ``expected`` is false."""
    return [
        Problem(case, os.path.join(folder, e.name), f"unexpected {'folder' if e.is_dir() else 'file'} ({what})")
        for e in _visible(folder)
        if not expected(e.name)
    ]


def _scan_brats(layout: str, data_dir: str) -> LayoutScan:
    pattern, sep, suffixes = _BRATS[layout]
    scan = LayoutScan()
    for case in (d for d in _subdirs(data_dir) if pattern.fullmatch(d)):
        folder = os.path.join(data_dir, case)
        names = {m: f"{case}{sep}{s}{_NII}" for m, s in suffixes.items()}
        seg = f"{case}{sep}seg{_NII}"
        expected = f"{case}{sep}{{{','.join([*suffixes.values(), 'seg'])}}}{_NII}"
        scan.stray += _strays(case, folder, {*names.values(), seg}.__contains__, f"expected {expected}")
        missing = [n for n in names.values() if not os.path.isfile(os.path.join(folder, n))]
        scan.problems += [Problem(case, os.path.join(folder, n), f"missing {n}") for n in missing]
        if missing:
            continue
        item: dict[str, Any] = {"case": case, "image": [_rel(case, names[m]) for m in BRAIN_MODALITIES]}
        if os.path.isfile(os.path.join(folder, seg)):
            item["label"] = _rel(case, seg)
        scan.items.append(item)
    if not scan.items and not scan.problems:
        files = "{" + ",".join([*suffixes.values(), "seg"]) + "}"
        example = (
            "BraTS2021_XXXXX/BraTS2021_XXXXX_" if layout == "brats2021" else "BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-"
        )
        scan.problems.append(
            Problem(DATASET, data_dir, f"no {layout} case folder found (expected {example}{files}{_NII})")
        )
    return scan


def _scan_msd(data_dir: str) -> LayoutScan:
    json_path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(json_path):
        raise DataError(json_path, "not found (expected a Decathlon Task01_BrainTumour folder)")
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(json_path, f"not a readable JSON file ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DataError(json_path, 'no "training" list')
    scan = LayoutScan()
    modality = meta.get("modality")
    if isinstance(modality, dict):
        found = [str(modality.get(str(i), "")) for i in range(len(modality))]
        if [m.lower() for m in found] != [m.lower() for m in MSD_CHANNEL_ORDER]:
            scan.problems.append(
                Problem(DATASET, json_path, f"modalities {found} differ from {list(MSD_CHANNEL_ORDER)}")
            )

    def relative(entry: Any) -> str:
        return os.path.normpath(str(entry)).replace(os.sep, "/")

    entries = [
        ("training", i, *((e.get("image"), e.get("label")) if isinstance(e, dict) else (None, None)))
        for i, e in enumerate(meta["training"])
    ]
    entries += [
        ("test", i, e.get("image") if isinstance(e, dict) else e, None) for i, e in enumerate(meta.get("test") or [])
    ]
    listed: set[str] = set()
    for list_name, i, image, label in entries:
        if image is None or (list_name == "training" and label is None):
            scan.problems.append(
                Problem(DATASET, json_path, f'entry {i} of "{list_name}" lacks an image or a label path')
            )
            continue
        item: dict[str, Any] = {"case": os.path.basename(relative(image)).removesuffix(_NII), "image": relative(image)}
        if label is not None:
            item["label"] = relative(label)
        item["channel_order"] = list(MSD_CHANNEL_ORDER)
        files = [item[k] for k in ("image", "label") if k in item]
        listed.update(files)
        missing = [m for m in files if not os.path.isfile(os.path.join(data_dir, *m.split("/")))]
        scan.problems += [Problem(item["case"], os.path.join(data_dir, *m.split("/")), f"missing {m}") for m in missing]
        if not missing:
            scan.items.append(item)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        if os.path.isdir(os.path.join(data_dir, folder)):
            names = {m.split("/", 1)[1] for m in listed if m.startswith(f"{folder}/")}
            strays = _strays(DATASET, os.path.join(data_dir, folder), names.__contains__, "not in dataset.json")
            scan.stray += [Problem(os.path.basename(p.path).removesuffix(_NII), p.path, p.problem) for p in strays]
    if not scan.items and not scan.problems:
        scan.problems.append(Problem(DATASET, json_path, "lists no case"))
    return scan


def _scan_mosmed(data_dir: str) -> LayoutScan:
    studies_dir = os.path.join(data_dir, "studies")
    if not os.path.isdir(studies_dir):
        raise DataError(data_dir, "no studies/ folder (expected studies/CT-0..CT-4/study_XXXX.nii.gz)")
    scan = LayoutScan()
    found: dict[str, dict[str, Any]] = {}
    scan.stray += _strays(DATASET, studies_dir, _MOSMED_CATEGORY.fullmatch, "expected category folders CT-0..CT-4")
    for category in (d for d in _subdirs(studies_dir) if _MOSMED_CATEGORY.fullmatch(d)):
        folder = os.path.join(studies_dir, category)
        scan.stray += _strays(DATASET, folder, _MOSMED_STUDY.fullmatch, f"expected study_XXXX{_NII}")
        for name in (e.name for e in _visible(folder)):
            match = _MOSMED_STUDY.fullmatch(name)
            if not match:
                continue
            study = match.group(1)
            if study in found:
                problem = f"in both {found[study]['category']} and {category}"
                scan.problems.append(Problem(study, os.path.join(folder, name), problem))
                continue
            found[study] = {"case": study, "image": _rel("studies", category, name), "category": category}
    masks_dir = os.path.join(data_dir, "masks")
    if os.path.isdir(masks_dir):
        scan.stray += _strays(DATASET, masks_dir, _MOSMED_MASK.fullmatch, f"expected study_XXXX_mask{_NII}")
    for name in (e.name for e in _visible(masks_dir)) if os.path.isdir(masks_dir) else []:
        match = _MOSMED_MASK.fullmatch(name)
        if not match:
            continue
        if match.group(1) not in found:
            problem = f"no matching study studies/CT-*/{match.group(1)}{_NII}"
            scan.problems.append(Problem(DATASET, os.path.join(masks_dir, name), problem))
        else:
            found[match.group(1)]["label"] = _rel("masks", name)
    if not found and not scan.problems:
        problem = "no study found (expected studies/CT-0..CT-4/study_XXXX.nii.gz)"
        scan.problems.append(Problem(DATASET, data_dir, problem))
    scan.items = list(found.values())
    return scan


def _scan_adni(data_dir: str) -> LayoutScan:
    scan = LayoutScan()
    seen: dict[str, str] = {}
    for subject in _subdirs(data_dir):
        folder = os.path.join(data_dir, subject)
        scan.stray += _strays(subject, folder, _ADNI.fullmatch, f"expected <image_id>_{{mri,FDG}}_MNI152{_NII}")
        pairs: dict[str, dict[str, str]] = {}
        for name in (e.name for e in _visible(folder)):
            match = _ADNI.fullmatch(name)
            if match:
                pairs.setdefault(match.group(1), {})[match.group(2)] = name
        if not pairs:
            problem = f"no <image_id>_mri_MNI152{_NII} / <image_id>_FDG_MNI152{_NII} pair"
            scan.problems.append(Problem(subject, folder, problem))
        for image_id, files in sorted(pairs.items()):
            case = f"{subject}/{image_id}"
            missing = [f"{image_id}_{k}_MNI152{_NII}" for k in ("mri", "FDG") if k not in files]
            scan.problems += [Problem(case, os.path.join(folder, m), f"missing {m}") for m in missing]
            if image_id in seen:
                problem = f"in both subjects {seen[image_id]} and {subject}"
                scan.problems.append(Problem(case, folder, problem))
            seen[image_id] = subject
            if not missing:
                item = {"case": image_id, "subject": subject}
                item |= {"mri": _rel(subject, files["mri"]), "pet": _rel(subject, files["FDG"])}
                scan.items.append(item)
    if not scan.items and not scan.problems:
        problem = f"no subject folder found (expected <subject>/<image_id>_mri_MNI152{_NII})"
        scan.problems.append(Problem(DATASET, data_dir, problem))
    return scan


_SCANNERS: dict[str, Callable[[str], LayoutScan]] = {
    "brats2021": lambda d: _scan_brats("brats2021", d),
    "brats2023": lambda d: _scan_brats("brats2023", d),
    "msd_task01": _scan_msd,
    "mosmed": _scan_mosmed,
    "adni_pairs": _scan_adni,
}


def scan_layout(layout: str, data_dir: str | os.PathLike) -> LayoutScan:
    """Find every case of ``data_dir`` in ``layout`` without reading the images (file names only).

    Raises:
        ValueError: unknown layout.
        DataError: the folder does not exist, or cannot be in the layout at all (MSD without a readable
            ``dataset.json``, MosMed without ``studies/``).
    """
    _check_layout(layout)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(data_dir, "data folder not found")
    return _SCANNERS[layout](data_dir)


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
        return f"an uncompressed NIfTI file named {_NII} (gzip it or rename it .nii)" if path.endswith(".gz") else None
    return f"not a NIfTI file (starts with {head[:16]!r})"


def _value_problems(data: np.ndarray, layout: str, channel_names: Sequence[str] | None) -> list[str]:
    """Plausibility of an image's values: not constant, CT in HU, MRI/PET non-negative (see module docstring)."""
    problems = []
    channels = [data[..., c] for c in range(data.shape[-1])] if data.ndim == 4 else [data]
    for c, volume in enumerate(channels):
        prefix = f"channel {c} ({channel_names[c]}): " if channel_names is not None and data.ndim == 4 else ""
        low, high = float(volume.min()), float(volume.max())
        if low == high:
            problems.append(
                prefix + ("all zero (empty image)" if low == 0 else f"constant image (every voxel {low:g})")
            )
        elif layout == "mosmed" and low > CT_AIR_HU:
            problems.append(
                f"{prefix}not in Hounsfield units: lowest value {low:g} > {CT_AIR_HU:g} (a chest CT holds air at "
                "about -1000 HU; was it rescaled, or the DICOM rescale intercept not applied?)"
            )
        elif layout != "mosmed" and low < -NEGATIVE_TOLERANCE * max(abs(low), abs(high)):
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
        case = os.path.basename(files[0]).removesuffix(_NII) if files else "<item>"
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
    layout: str,
    base_dir: str | None = None,
    *,
    thorough: bool = True,
    atol: float = 1e-3,
) -> list[Problem]:
    """Read every file of one datalist item and return all its problems (never raises for bad data).

    Args:
        item: a datalist item: ``image`` (a path or a list of paths) and optionally ``label``, or ``mri`` and
            ``pet`` for ``adni_pairs``; ``case`` (and ``subject``) name it in the problems, else the first
            file's name does.
        layout: one of :data:`LAYOUTS`: the expected image shape (MSD: 4D, 4 channels; else 3D), the label
            convention and the intensity rules.
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
    _check_layout(layout)
    image_keys = ("mri", "pet") if layout == "adni_pairs" else ("image",)
    images = [path for key in image_keys for path in _as_list(item.get(key))]
    labels = _as_list(item.get("label"))
    join = (lambda p: p) if base_dir is None else (lambda p: os.path.join(os.fspath(base_dir), *p.split("/")))
    case = _case_name(item, images + labels)
    problems = [Problem(case, "<datalist item>", f"no {key!r} path") for key in image_keys if not item.get(key)]
    expected = len(BRAIN_MODALITIES) if layout in _BRATS else 1
    if layout in _BRATS and images and len(images) != expected:
        problems.append(Problem(case, join(images[0]), f"expected {expected} modality files, got {len(images)}"))
    shape = {"ndim": 4, "channels": len(MSD_CHANNEL_ORDER)} if layout == "msd_task01" else {"ndim": 3}
    channel_names = MSD_CHANNEL_ORDER if layout == "msd_task01" else None
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
            if role == "label" and layout == "mosmed":
                check_binary_mask(data, path)
            elif role == "label":
                check_label_values(data, layout, path)
            elif thorough:
                problems += [Problem(case, path, p) for p in _value_problems(data, layout, channel_names)]
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
    layout: str,
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
    _check_layout(layout)
    workers = max(1, min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers))
    with ThreadPoolExecutor(workers) as pool:
        results: Iterable[list[Problem]] = pool.map(
            lambda it: check_item(it, layout, base_dir, thorough=thorough, atol=atol), items
        )
        if progress:  # disable=None: a bar only on a terminal
            results = tqdm(
                results,
                total=len(items),
                desc=f"checking {layout}",
                unit="case",
                file=sys.stderr,
                leave=False,
                disable=None,
            )
        return list(results)


# ----------------------------------------------------------------------------------------------- datasets


def dataset_report(
    layout: str,
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
    _check_layout(layout)
    data_dir = os.fspath(data_dir)
    try:
        scan = scan_layout(layout, data_dir)
    except DataError as err:
        if not os.path.isdir(data_dir):
            raise
        scan = LayoutScan(problems=[Problem(DATASET, err.path, err.problem)])
    checked = check_items(scan.items, layout, data_dir, num_workers=num_workers, progress=progress, atol=atol)
    problems = scan.problems + scan.stray + [p for found in checked for p in found]
    problems.sort(key=lambda p: (p.case != DATASET, p.case))
    cases = {_case_name(it, []) for it in scan.items} | {p.case for p in scan.problems if p.case != DATASET}
    return IntegrityReport(layout, data_dir, len(cases), problems)


def verify_dataset(layout: str, data_dir: str) -> list[Problem]:
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
    if layout not in LAYOUTS:
        problem = f"layout {layout!r} is not one of {', '.join(LAYOUTS)} (write it with tools/prepare_datalist.py)"
        raise DataError(data_list_file_path, problem)
    items = [item for key in keys for item in load_datalist(data_list_file_path, key, dataset_dir)]
    return [p for found in check_items(items, layout) for p in found]


def require_valid_datalist(
    data_list_file_path: str, dataset_dir: str, keys: Sequence[str] = ("training", "validation")
) -> None:
    """Raise :class:`~common.errors.DataError` listing every problem (one per line) of the datalist's cases.

    Called at the start of training, so that a bad file stops the run before the first epoch, not after hours;
    in a bundle config: ``"$common.data.integrity.require_valid_datalist(@data_list_file_path, @dataset_dir)"``.
    """
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
        files = [f for it in items for key in ("image", "label", "mri", "pet") for f in _as_list(it.get(key))]
        where = os.path.commonpath([os.path.abspath(f) for f in files]) if files else "<no item>"
        raise DataError(where, f"no usable case: all {len(items)} failed the integrity check (see the warnings)")
    return good
