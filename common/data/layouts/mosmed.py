"""MosMedData COVID19_1110 chest CT: ``DIR/studies/CT-{0..4}/study_XXXX.nii.gz`` and lesion masks
``DIR/masks/study_XXXX_mask.nii.gz``; other folders are ignored.

A study is one CT in Hounsfield units; masks are binary. The studies with a mask are the only ground truth, so
they are evaluation data: split between ``validation`` and ``testing``, never in ``training``. Items carry the
severity ``category`` (``common.data.mosmed`` selects by it).
"""

from __future__ import annotations

import os
import re
from typing import Any

from common.data.layouts.base import (
    ANY,
    DATASET,
    EVALUATION,
    HOUNSFIELD,
    NII,
    DatasetLayout,
    LayoutScan,
    Problem,
    posix_path,
    stray_problems,
    subfolders,
    visible_entries,
)
from common.errors import DataError

__all__ = ["LAYOUT", "scan_mosmed"]

_CATEGORY = re.compile(r"CT-[0-4]")
_STUDY = re.compile(r"(study_\d+)\.nii\.gz")
_MASK = re.compile(r"(study_\d+)_mask\.nii\.gz")


def scan_mosmed(data_dir: str) -> LayoutScan:
    """Every study of ``studies/CT-*/`` with its category, and its mask from ``masks/`` when it has one.

    Raises:
        DataError: there is no ``studies/`` folder.
    """
    studies_dir = os.path.join(data_dir, "studies")
    if not os.path.isdir(studies_dir):
        raise DataError(data_dir, "no studies/ folder (expected studies/CT-0..CT-4/study_XXXX.nii.gz)")
    scan = LayoutScan()
    found: dict[str, dict[str, Any]] = {}
    scan.stray += stray_problems(DATASET, studies_dir, _CATEGORY.fullmatch, "expected category folders CT-0..CT-4")
    for category in (d for d in subfolders(studies_dir) if _CATEGORY.fullmatch(d)):
        folder = os.path.join(studies_dir, category)
        scan.stray += stray_problems(DATASET, folder, _STUDY.fullmatch, f"expected study_XXXX{NII}")
        for name in (e.name for e in visible_entries(folder)):
            match = _STUDY.fullmatch(name)
            if not match:
                continue
            study = match.group(1)
            if study in found:
                problem = f"in both {found[study]['category']} and {category}"
                scan.problems.append(Problem(study, os.path.join(folder, name), problem))
                continue
            found[study] = {"case": study, "image": posix_path("studies", category, name), "category": category}
    masks_dir = os.path.join(data_dir, "masks")
    if os.path.isdir(masks_dir):
        scan.stray += stray_problems(DATASET, masks_dir, _MASK.fullmatch, f"expected study_XXXX_mask{NII}")
    for name in (e.name for e in visible_entries(masks_dir)) if os.path.isdir(masks_dir) else []:
        match = _MASK.fullmatch(name)
        if not match:
            continue
        if match.group(1) not in found:
            problem = f"no matching study studies/CT-*/{match.group(1)}{NII}"
            scan.problems.append(Problem(DATASET, os.path.join(masks_dir, name), problem))
        else:
            found[match.group(1)]["label"] = posix_path("masks", name)
    if not found and not scan.problems:
        problem = "no study found (expected studies/CT-0..CT-4/study_XXXX.nii.gz)"
        scan.problems.append(Problem(DATASET, data_dir, problem))
    scan.items = list(found.values())
    return scan


LAYOUT = DatasetLayout(
    name="mosmed",
    scan=scan_mosmed,
    value_rule=HOUNSFIELD,
    labelled_role=EVALUATION,
    unlabelled_role=ANY,
    evaluation_label="masks/{case}_mask.nii.gz",
    image_defines_case=True,
    synthetic_writer="common.data.synthetic.write.write_mosmed",
    synthetic_shape=(128, 128, 32),
    synthetic_truth="synthetic_truth/{case}_mask.nii.gz",
)
