"""Datalists (Decathlon-style JSON) for the real layouts of the collection's datasets.

A user brings a dataset in the layout it is distributed in; :func:`build_datalist` finds every case,
reports every problem of the folder in one error, optionally reads every file to check it, and splits
the cases deterministically. Finding the cases and checking their files is :mod:`common.data.integrity`'s
job (``scan_layout``, ``check_items``), shared with ``tools/verify_dataset.py``; this module splits and writes.
The folder trees, and the split role, grouping key and dataset-level facts of each layout, are defined in
:mod:`common.data.layouts` (one module per layout: ``brats2021``, ``brats2023``, ``msd_task01``, ``mosmed``,
``adni_pairs``).

Split rules, which a user must know:

- Brain cases without a segmentation (BraTS validation downloads, MSD ``imagesTs``) go to ``testing``
  only and have no ``label`` key.
- MosMed studies with a mask are evaluation data: they are split between ``validation`` and
  ``testing`` in the ratio ``val_fraction : test_fraction`` and never enter ``training``;
  :func:`validate_datalist_no_leak` re-checks this when training starts.
- ADNI pairs are split by subject, so that no subject is in two lists (a layout's ``group_key``); a group
  takes the strictest role of its items (one test-only item sends the whole group to ``testing``).
- Fractions count cases (subjects for ``adni_pairs``). With 3 or more, every list whose fraction is
  positive gets at least one.
- With ``num_folds=K``: ``test_fraction`` of the cases is held out in ``testing``; the rest is dealt into
  K folds, fold ``fold`` is ``validation`` and the others ``training``; those items carry ``"fold": k``
  (``val_fraction`` is then used only for the MosMed masked studies, which stay in ``validation``).

Paths in the datalist are relative to ``data_dir`` (POSIX separators), so the folder can move.
MONAI's ``load_decathlon_datalist(..., base_dir=data_dir)`` resolves the ``image`` and ``label`` keys;
the ADNI keys ``mri`` and ``pet`` are joined to the data folder by the bundle.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from typing import Any

from common.data.integrity import (
    DATASET,
    LAYOUTS,
    MSD_CHANNEL_ORDER,
    Problem,
    check_items,
    scan_layout,
)
from common.data.layouts import ANY, EVALUATION, TEST, find_layout, get_layout
from common.errors import DataError
from common.io import atomic_path

__all__ = [
    "LAYOUTS",
    "MSD_CHANNEL_ORDER",
    "build_datalist",
    "check_split_options",
    "save_datalist",
    "validate_datalist_no_leak",
]

_LIST_KEYS = ("training", "validation", "testing")
_STRICTNESS = (ANY, EVALUATION, TEST)  # split roles, from the least to the most restricted


def check_split_options(
    layout: str, val_fraction: float, test_fraction: float, num_folds: int | None, fold: int
) -> None:
    """Raise ``ValueError`` with a clear message if the layout or split options are invalid."""
    get_layout(layout)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if num_folds is None and val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    if num_folds is not None and (int(num_folds) != num_folds or num_folds < 2):
        raise ValueError(f"num_folds must be an integer >= 2 or None, got {num_folds}")
    if num_folds is not None and not (int(fold) == fold and 0 <= fold < num_folds):
        raise ValueError(f"fold must be an integer in [0, {num_folds}), got {fold}")


def _take(n: int, fractions: tuple[float, ...]) -> list[int]:
    """How many of ``n`` groups each fraction gets (training keeps the rest).

    When ``n > len(fractions)``, every positive fraction gets at least one and training keeps at least one.
    """
    counts = [round(n * f) for f in fractions]
    if n >= len(fractions) + 1:
        counts = [max(c, 1) if f > 0 else c for c, f in zip(counts, fractions)]
    while sum(counts) >= n and n > 0 and max(counts) > 0:
        floor = 1 if n >= len(fractions) + 1 else 0
        i = max(range(len(counts)), key=lambda j: counts[j])
        if counts[i] <= floor:
            break
        counts[i] -= 1
    return counts


def _split(
    groups: list[str],
    rng: random.Random,
    val_fraction: float,
    test_fraction: float,
    num_folds: int | None,
    fold: int,
    data_dir: str,
) -> dict[str, tuple[str, int | None]]:
    """Assign each group (case or subject) to (list name, fold or None)."""
    order = sorted(set(groups))
    rng.shuffle(order)
    if num_folds is None:
        n_val, n_test = _take(len(order), (val_fraction, test_fraction))
        out = {g: ("testing", None) for g in order[:n_test]}
        out |= {g: ("validation", None) for g in order[n_test : n_test + n_val]}
        return out | {g: ("training", None) for g in order[n_test + n_val :]}
    (n_test,) = _take(len(order), (test_fraction,))
    if len(order) - n_test < num_folds:
        raise DataError(data_dir, f"{len(order) - n_test} cases outside testing cannot fill {num_folds} folds")
    out = {g: ("testing", None) for g in order[:n_test]}
    for i, g in enumerate(order[n_test:]):
        out[g] = ("validation" if i % num_folds == fold else "training", i % num_folds)
    return out


def _split_evaluation(
    groups: list[str], rng: random.Random, val_fraction: float, test_fraction: float
) -> dict[str, tuple[str, None]]:
    """Split evaluation-only groups (masked MosMed studies) between validation and testing, never training."""
    order = sorted(set(groups))
    rng.shuffle(order)
    if val_fraction == 0:
        n_test = len(order)
    elif test_fraction == 0:
        n_test = 0
    else:
        (n_test,) = _take(len(order), (test_fraction / (val_fraction + test_fraction),))
    return {g: ("testing" if i < n_test else "validation", None) for i, g in enumerate(order)}


def build_datalist(
    layout: str,
    data_dir: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    num_folds: int | None = None,
    fold: int = 0,
    check_data: bool = True,
    progress: bool = True,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Scan ``data_dir`` in ``layout``, check it, and split its cases into training, validation and testing.

    Every problem of the folder (missing files, and with ``check_data`` every unreadable, truncated,
    wrongly shaped, non-finite, off-grid or wrongly labelled file) is collected in one pass and raised as
    one :class:`~common.errors.DataError` listing each (``"BraTS2021_00003: missing
    BraTS2021_00003_t2.nii.gz; ..."``); a single problem is raised with its own file as the path.

    Args:
        layout: a registered layout's name (:func:`~common.data.layouts.layout_names`).
        data_dir: the dataset folder.
        seed: seed of the split; the result is a function of (files found, seed, fractions, folds).
        val_fraction: fraction of the cases in ``validation`` (ignored for the folds with ``num_folds``).
        test_fraction: fraction of the cases held out in ``testing``.
        num_folds: ``None`` for a single split, or K >= 2 for K-fold cross-validation.
        fold: the fold used as ``validation`` (``0 <= fold < num_folds``).
        check_data: read every file with :func:`~common.data.nifti.load_nifti` and check it.
        progress: show a progress bar on stderr while checking (only on a terminal; it is cleared when done).
        num_workers: threads reading files while checking (decompression releases the GIL).

    Returns:
        ``{"layout", [the layout's ``datalist_header()``: "label_convention", "modalities" (brain),
        "channel_order" (MSD)], "seed", ["num_folds", "fold"], "training", "validation", "testing"}``; items are
        sorted by case id. Item keys: BraTS ``case, image (t1c, t1, t2, flair), label``; MSD ``case, image,
        label, channel_order``; MosMed ``case, image, category, label (masked studies)``; ADNI
        ``case, subject, mri, pet``.
    """
    check_split_options(layout, val_fraction, test_fraction, num_folds, fold)
    spec = get_layout(layout)
    num_folds, fold = (None if num_folds is None else int(num_folds)), int(fold)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(data_dir, "data folder not found")
    scan = scan_layout(spec, data_dir)
    # a missing or duplicate file is the case's problem (named by case); dataset-level ones by their path
    errors = [DataError(p.path if p.case == DATASET else p.case, p.problem) for p in scan.problems]
    if check_data and scan.items:
        checked = check_items(
            scan.items, spec, data_dir, thorough=False, num_workers=int(num_workers), progress=progress
        )
        errors += [_file_error(p) for found in checked for p in found]
    _raise_problems(data_dir, errors)

    def group_of(item: dict[str, Any]) -> str:
        return item[spec.group_key]

    roles: dict[str, str] = {}  # a group's strictest item role: one test-only item makes it a test group
    for item in scan.items:
        role, group = spec.split_role(item), group_of(item)
        roles[group] = max(roles.get(group, ANY), role, key=_STRICTNESS.index)
    rng = random.Random(seed)
    assignment: dict[str, tuple[str, int | None]] = {}
    trainable = [g for g, r in roles.items() if r == ANY]
    assignment |= _split(trainable, rng, val_fraction, test_fraction, num_folds, fold, data_dir)
    evaluation = [g for g, r in roles.items() if r == EVALUATION]
    assignment |= _split_evaluation(evaluation, rng, val_fraction, test_fraction)
    assignment |= {g: ("testing", None) for g, r in roles.items() if r == TEST}

    datalist: dict[str, Any] = {"layout": spec.name, **spec.datalist_header(), "seed": seed}
    if num_folds is not None:
        datalist |= {"num_folds": num_folds, "fold": fold}
    datalist |= {key: [] for key in _LIST_KEYS}
    for item in sorted(scan.items, key=lambda it: it["case"]):
        target, k = assignment[group_of(item)]
        datalist[target].append(item if k is None else {**item, "fold": k})
    return datalist


def _file_error(problem: Problem) -> DataError:
    return DataError(problem.path, problem.problem)


def _raise_problems(data_dir: str, problems: list[DataError]) -> None:
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise DataError(data_dir, f"{len(problems)} problems: " + "; ".join(str(p) for p in problems))


def validate_datalist_no_leak(
    datalist: Mapping[str, Any] | str | os.PathLike, data_dir: str | None = None, missing_ok: bool = False
) -> None:
    """Raise :class:`~common.errors.DataError` if evaluation data could leak into training.

    Checked for every layout: no group (the layout's ``group_key``: case, or subject for ``adni_pairs``) is in
    two of training, validation, testing. For layouts whose labelled items are evaluation data (``mosmed``) also:
    no training item has a ``label``, and, if ``data_dir`` is given, no training case has its label (the
    layout's ``evaluation_label``, MosMed ``masks/<study>_mask.nii.gz``) on disk (the masks are the only ground
    truth; training the GAN on them would inflate every reported number).

    Args:
        datalist: the datalist dict, or the path of its JSON file (then named in the error).
        data_dir: the dataset folder, to look for masks on disk.
        missing_ok: when ``datalist`` is a path with no file, check nothing (MONAI Label trains with the data as
            overrides and no datalist); otherwise a missing file is an error.
    """
    name = "datalist"
    if not isinstance(datalist, Mapping):
        name = os.fspath(datalist)
        if missing_ok and not os.path.isfile(name):
            return
        try:
            with open(name) as f:
                datalist = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(name, f"not a readable datalist JSON ({err})") from err
    layout = datalist.get("layout")
    spec = find_layout(layout)
    key = spec.group_key if spec is not None else "case"
    problems, where = [], {}
    for list_name in _LIST_KEYS:
        for item in datalist.get(list_name, []):
            group = item.get(key, item.get("case"))
            if group in where and where[group] != list_name:
                problems.append(f"{key} {group} is in both {where[group]} and {list_name}")
            where.setdefault(group, list_name)
    if spec is not None and spec.labelled_role == EVALUATION:
        for item in datalist.get("training", []):
            if "label" in item:
                problems.append(f"training study {item.get('case')} has a label ({item['label']})")
            if spec.evaluation_label is None or data_dir is None:
                continue
            mask = spec.evaluation_label.format(case=item.get("case"))
            if os.path.isfile(os.path.join(os.fspath(data_dir), *mask.split("/"))):
                problems.append(f"training study {item.get('case')} has a mask {mask}")
    if problems:
        raise DataError(name, "evaluation data in training: " + "; ".join(problems))


def save_datalist(datalist: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``datalist`` as indented JSON, atomically (no partial file on failure)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(datalist, f, indent=2)
        f.write("\n")
