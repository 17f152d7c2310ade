"""The BraTS family of layouts: one folder per case, one NIfTI file per modality plus the segmentation.

``DIR/<case>/<case><sep>{<t1c>,<t1>,<t2>,<flair>,seg}.nii.gz``: the challenges differ only in the case folder
pattern, the separator, the file suffix of each modality and the label convention, which :class:`BratsNaming`
holds. :func:`brats_layout` makes a :class:`~common.data.layouts.base.DatasetLayout` of a naming; a new BraTS
release is one more naming (see ``brats2021.py``, ``brats2023.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from common.data.labels import BRAIN_MODALITIES
from common.data.layouts.base import (
    ANY,
    DATASET,
    NII,
    TEST,
    DatasetLayout,
    LayoutScan,
    Problem,
    posix_path,
    stray_problems,
    subfolders,
)

__all__ = ["BratsNaming", "brats_layout", "scan_brats"]


@dataclass(frozen=True)
class BratsNaming:
    """File naming of a BraTS-style release.

    Args:
        layout: the layout's name (in messages).
        case_folder: regular expression a case folder's whole name matches.
        separator: between the case id and a file suffix.
        suffixes: file suffix of each standard modality, keys :data:`~common.data.labels.BRAIN_MODALITIES`.
        example: a case id pattern for messages (``BraTS2021_XXXXX``).
        synthetic_case: ``str.format`` pattern of the synthetic writer's case ids, of the case index.
        label_convention: a key of ``common.data.labels.LABEL_CONVENTIONS``.
    """

    layout: str
    case_folder: str
    separator: str
    suffixes: Mapping[str, str]
    example: str
    synthetic_case: str
    label_convention: str

    def file(self, case: str, suffix: str) -> str:
        """A case's file name: ``<case><sep><suffix>.nii.gz`` (``suffix`` a modality suffix or ``seg``)."""
        return f"{case}{self.separator}{suffix}{NII}"


def scan_brats(naming: BratsNaming, data_dir: str) -> LayoutScan:
    """Every case folder of ``data_dir`` matching ``naming``; a case without its ``seg`` file is unlabelled."""
    pattern = re.compile(naming.case_folder)
    scan = LayoutScan()
    files = "{" + ",".join([*naming.suffixes.values(), "seg"]) + "}"
    for case in (d for d in subfolders(data_dir) if pattern.fullmatch(d)):
        folder = os.path.join(data_dir, case)
        names = {m: naming.file(case, s) for m, s in naming.suffixes.items()}
        seg = naming.file(case, "seg")
        expected = f"{case}{naming.separator}{files}{NII}"
        scan.stray += stray_problems(case, folder, {*names.values(), seg}.__contains__, f"expected {expected}")
        missing = [n for n in names.values() if not os.path.isfile(os.path.join(folder, n))]
        scan.problems += [Problem(case, os.path.join(folder, n), f"missing {n}") for n in missing]
        if missing:
            continue
        item: dict[str, Any] = {"case": case, "image": [posix_path(case, names[m]) for m in BRAIN_MODALITIES]}
        if os.path.isfile(os.path.join(folder, seg)):
            item["label"] = posix_path(case, seg)
        scan.items.append(item)
    if not scan.items and not scan.problems:
        example = f"{naming.example}/{naming.example}{naming.separator}{files}{NII}"
        scan.problems.append(Problem(DATASET, data_dir, f"no {naming.layout} case folder found (expected {example})"))
    return scan


def brats_layout(naming: BratsNaming) -> DatasetLayout:
    """The layout of a BraTS-style release: 4 modality files per case (listed T1c, T1, T2, FLAIR) and a ``seg``.

    Cases without a segmentation (validation downloads) go to ``testing`` only; intensities are MRI (non-negative);
    the synthetic writer is :func:`common.data.synthetic.write.write_brats` with this naming.
    """
    return DatasetLayout(
        name=naming.layout,
        scan=partial(scan_brats, naming),
        image_files=len(BRAIN_MODALITIES),
        modalities=BRAIN_MODALITIES,
        label_convention=naming.label_convention,
        labelled_role=ANY,
        unlabelled_role=TEST,
        synthetic_writer="common.data.synthetic.write.write_brats",
        synthetic_options={"naming": naming},
        synthetic_shape=(240, 240, 155),
    )
