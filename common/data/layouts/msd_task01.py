"""Medical Segmentation Decathlon Task01_BrainTumour: ``DIR/dataset.json`` listing ``imagesTr/``, ``labelsTr/``,
``imagesTs/``; one 4D image per case with channels FLAIR, T1w, T1gd, T2w.

Labels 0-3 (``msd_task01`` convention: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour). The bundles reorder
the channels to T1c, T1, T2, FLAIR with ``common.data.labels.MSD_TO_STANDARD``; ``imagesTs`` cases (no label) go
to ``testing`` only.
"""

from __future__ import annotations

import json
import os
from typing import Any

from common.data.labels import BRAIN_MODALITIES, MSD_TO_STANDARD
from common.data.layouts.base import ANY, DATASET, NII, TEST, DatasetLayout, LayoutScan, Problem, stray_problems
from common.errors import DataError

__all__ = ["CHANNEL_ORDER", "LAYOUT", "scan_msd_task01"]

#: Channel order of the MSD Task01 4D images (``common.data.labels.MSD_TO_STANDARD`` reorders them).
CHANNEL_ORDER: tuple[str, str, str, str] = ("FLAIR", "T1w", "T1gd", "T2w")


def scan_msd_task01(data_dir: str) -> LayoutScan:
    """The cases ``dataset.json`` lists (``training`` and ``test``), checked against the files of its folders.

    Raises:
        DataError: ``dataset.json`` is missing, unreadable or has no ``training`` list.
    """
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
        if [m.lower() for m in found] != [m.lower() for m in CHANNEL_ORDER]:
            scan.problems.append(Problem(DATASET, json_path, f"modalities {found} differ from {list(CHANNEL_ORDER)}"))

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
        item: dict[str, Any] = {"case": os.path.basename(relative(image)).removesuffix(NII), "image": relative(image)}
        if label is not None:
            item["label"] = relative(label)
        item["channel_order"] = list(CHANNEL_ORDER)
        files = [item[k] for k in ("image", "label") if k in item]
        listed.update(files)
        missing = [m for m in files if not os.path.isfile(os.path.join(data_dir, *m.split("/")))]
        scan.problems += [Problem(item["case"], os.path.join(data_dir, *m.split("/")), f"missing {m}") for m in missing]
        if not missing:
            scan.items.append(item)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        if os.path.isdir(os.path.join(data_dir, folder)):
            names = {m.split("/", 1)[1] for m in listed if m.startswith(f"{folder}/")}
            strays = stray_problems(DATASET, os.path.join(data_dir, folder), names.__contains__, "not in dataset.json")
            scan.stray += [Problem(os.path.basename(p.path).removesuffix(NII), p.path, p.problem) for p in strays]
    if not scan.items and not scan.problems:
        scan.problems.append(Problem(DATASET, json_path, "lists no case"))
    return scan


LAYOUT = DatasetLayout(
    name="msd_task01",
    scan=scan_msd_task01,
    channel_order=CHANNEL_ORDER,
    channel_reorder=MSD_TO_STANDARD,
    modalities=BRAIN_MODALITIES,
    label_convention="msd_task01",
    labelled_role=ANY,
    unlabelled_role=TEST,
    synthetic_writer="common.data.synthetic.write.write_msd_task01",
    synthetic_shape=(240, 240, 155),
)
