"""Tests for common/data/decathlon.py: datalist items with their paths joined, the labelled ones for evaluation,
without labels for inference, and the dataset facts, with a default when there is no datalist (MONAI Label)."""

from __future__ import annotations

import json
import os

import pytest

from common.data.decathlon import datalist_info, labelled_items, load_datalist, without_labels
from common.errors import DataError


@pytest.fixture
def datalist(tmp_path):
    content = {
        "layout": "mosmed",
        "testing": [
            {"case": "study_0001", "image": "studies/CT-1/study_0001.nii.gz", "label": "masks/study_0001_mask.nii.gz"},
            {"case": "study_0002", "image": "studies/CT-0/study_0002.nii.gz"},
        ],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_labelled_items_keeps_the_cases_with_a_label_paths_joined(datalist):
    items = labelled_items(datalist, "testing", "/data")
    assert items == [
        {
            "case": "study_0001",
            "image": os.path.join("/data", "studies/CT-1/study_0001.nii.gz"),
            "label": os.path.join("/data", "masks/study_0001_mask.nii.gz"),
        }
    ]


def test_without_labels_drops_only_the_label_and_leaves_the_input(datalist):
    items = load_datalist(datalist, "testing", "/data")
    stripped = without_labels(items)
    assert [sorted(i) for i in stripped] == [["case", "image"], ["case", "image"]]
    assert stripped[0]["image"] == items[0]["image"] and "label" in items[0]  # copies: the input keeps its label


def test_datalist_info_default_only_when_there_is_no_file(datalist, tmp_path):
    default = {"layout": "brats2021", "label_convention": "brats2021", "channel_reorder": None}
    missing = str(tmp_path / "absent.json")
    assert datalist_info(missing, default=default) is default
    with pytest.raises(DataError, match="datalist not found"):
        datalist_info(missing)
    # a datalist that exists is read, the default ignored
    assert datalist_info(datalist, default=default) == {
        "layout": "mosmed",
        "label_convention": "mosmed",
        "channel_reorder": None,
    }
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a JSON datalist"):  # a broken file is an error, not a default
        datalist_info(str(tmp_path / "broken.json"), default=default)
