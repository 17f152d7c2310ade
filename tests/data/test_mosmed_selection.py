"""Tests for common/data/mosmed.py."""

from __future__ import annotations

import pytest

from common.data.mosmed import by_category, with_reference_masks
from common.errors import DataError

ITEMS = [
    {"case": "s1", "category": "CT-0"},
    {"case": "s2", "category": "CT-1", "label": "masks/s2_mask.nii.gz"},
    {"case": "s3", "category": "CT-3"},
]


def test_by_category_splits_healthy_and_covid():
    assert [it["case"] for it in by_category(ITEMS, healthy=True)] == ["s1"]
    assert [it["case"] for it in by_category(ITEMS, healthy=False)] == ["s2", "s3"]
    assert [it["case"] for it in by_category(ITEMS, healthy=True, healthy_categories=["CT-0", "CT-1"])] == ["s1", "s2"]
    with pytest.raises(DataError, match="no healthy"):
        by_category(ITEMS[1:], healthy=True, source="dl.json")
    with pytest.raises(DataError, match="without 'category'"):
        by_category([{"case": "x"}], healthy=False)


def test_with_reference_masks():
    assert [it["case"] for it in with_reference_masks(ITEMS)] == ["s2"]
    with pytest.raises(DataError, match="dl.json: none of the 2 studies"):
        with_reference_masks([ITEMS[0], ITEMS[2]], "dl.json")
