"""ADNI T1 MRI + FDG-PET pairs in MNI152 space: ``DIR/<subject>/<image_id>_mri_MNI152.nii.gz`` with
``<image_id>_FDG_MNI152.nii.gz``.

An item is one pair (``case`` the image id, ``subject``, paths ``mri`` and ``pet``); there are no labels. Pairs
are split by subject, so that no subject is in two lists.
"""

from __future__ import annotations

import os
import re

from common.data.layouts.base import (
    ANY,
    DATASET,
    NII,
    DatasetLayout,
    LayoutScan,
    Problem,
    posix_path,
    stray_problems,
    subfolders,
    visible_entries,
)

__all__ = ["LAYOUT", "scan_adni_pairs"]

_PAIR_FILE = re.compile(r"(.+)_(mri|FDG)_MNI152\.nii\.gz")


def scan_adni_pairs(data_dir: str) -> LayoutScan:
    """Every complete MRI-PET pair of every subject folder; an image id in two subjects is a problem."""
    scan = LayoutScan()
    seen: dict[str, str] = {}
    for subject in subfolders(data_dir):
        folder = os.path.join(data_dir, subject)
        what = f"expected <image_id>_{{mri,FDG}}_MNI152{NII}"
        scan.stray += stray_problems(subject, folder, _PAIR_FILE.fullmatch, what)
        pairs: dict[str, dict[str, str]] = {}
        for name in (e.name for e in visible_entries(folder)):
            match = _PAIR_FILE.fullmatch(name)
            if match:
                pairs.setdefault(match.group(1), {})[match.group(2)] = name
        if not pairs:
            problem = f"no <image_id>_mri_MNI152{NII} / <image_id>_FDG_MNI152{NII} pair"
            scan.problems.append(Problem(subject, folder, problem))
        for image_id, files in sorted(pairs.items()):
            case = f"{subject}/{image_id}"
            missing = [f"{image_id}_{k}_MNI152{NII}" for k in ("mri", "FDG") if k not in files]
            scan.problems += [Problem(case, os.path.join(folder, m), f"missing {m}") for m in missing]
            if image_id in seen:
                problem = f"in both subjects {seen[image_id]} and {subject}"
                scan.problems.append(Problem(case, folder, problem))
            seen[image_id] = subject
            if not missing:
                item = {"case": image_id, "subject": subject}
                item |= {"mri": posix_path(subject, files["mri"]), "pet": posix_path(subject, files["FDG"])}
                scan.items.append(item)
    if not scan.items and not scan.problems:
        problem = f"no subject folder found (expected <subject>/<image_id>_mri_MNI152{NII})"
        scan.problems.append(Problem(DATASET, data_dir, problem))
    return scan


LAYOUT = DatasetLayout(
    name="adni_pairs",
    scan=scan_adni_pairs,
    image_keys=("mri", "pet"),
    has_labels=False,
    group_key="subject",
    labelled_role=ANY,
    unlabelled_role=ANY,
    synthetic_writer="common.data.synthetic.write.write_adni_pairs",
    synthetic_shape=(128, 128, 128),
)
