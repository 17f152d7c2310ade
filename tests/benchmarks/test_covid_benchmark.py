"""Tests for the pieces of common/benchmarks/covid.py that run in-process (the stages are the bundle's, tested by
the harness); the whole benchmark takes minutes and is run through tools/benchmark_covid.py, not here."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.benchmarks.covid import (
    add_true_labels,
    check_targets,
    format_report,
    threshold_lesions,
    write_true_mask_dir,
)
from common.data.datalist import build_datalist, validate_datalist_no_leak
from common.data.pseudo_masks import load_slice_classes
from common.data.synthetic.write import write_mosmed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosmed")
    write_mosmed(str(root), shape=(48, 48, 16), seed=0, progress=False, category_counts={0: 2, 1: 4})
    datalist = build_datalist("mosmed", root, val_fraction=0.25, test_fraction=0.25, progress=False)
    return str(root), datalist


def test_true_labels_only_for_held_out_lesioned_studies(dataset):
    root, datalist = dataset
    labelled = add_true_labels(datalist, root)
    validate_datalist_no_leak(labelled, root)  # training untouched
    assert labelled["training"] == datalist["training"]
    for item in labelled["validation"] + labelled["testing"]:
        assert ("label" in item) == (item["category"] != "CT-0")
    assert json.dumps(datalist) != json.dumps(labelled)  # a copy was changed, not the input


def test_true_mask_dir_is_laid_out_like_the_pseudo_mask_stage(dataset, tmp_path):
    root, datalist = dataset
    out = write_true_mask_dir(datalist, root, str(tmp_path / "true"), grid=(8, 16, 16), seed=0)
    content = load_slice_classes(f"{out}/slice_classes.json", grid=(8, 16, 16))
    assert sorted(content["cases"]) == sorted(it["case"] for it in datalist["training"])
    for item in datalist["training"]:
        mask = nib.load(f"{out}/{item['case']}_pseudo.nii.gz")
        ref = nib.load(f"{root}/{item['image']}")
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
        if item["category"] == "CT-0":
            assert not np.asarray(mask.dataobj).any()
            assert all(b in (0.0, None) for b in content["cases"][item["case"]]["burden"])
        else:
            truth = np.asarray(nib.load(f"{root}/synthetic_truth/{item['case']}_mask.nii.gz").dataobj)
            np.testing.assert_array_equal(np.asarray(mask.dataobj), truth)
            assert max(b or 0.0 for b in content["cases"][item["case"]]["burden"]) > 0


def test_threshold_baseline_and_targets():
    hu = np.array([-900.0, -700.0, -400.0, 0.0, -500.0])
    lung = np.array([1, 1, 1, 1, 0], dtype=bool)
    np.testing.assert_array_equal(threshold_lesions(hu, lung, (-750.0, -100.0)), [False, True, True, False, False])
    with pytest.raises(ValueError, match="hi > lo"):
        threshold_lesions(hu, lung, (0.0, 0.0))
    results = {
        "transunet_pseudo": {"mean_dice": 0.6},
        "transunet_true": {"mean_dice": 0.7},
        "hu_threshold": {"mean_dice": 0.5},
    }
    assert check_targets(results) == {
        "beats_threshold_baseline": True,
        "fraction_of_upper_bound": pytest.approx(6 / 7),
        "reaches_80_percent_of_upper_bound": True,
    }
    results["hu_threshold"]["mean_dice"] = 0.65
    results["transunet_true"]["mean_dice"] = 0.9
    targets = check_targets(results)
    assert not targets["beats_threshold_baseline"] and not targets["reaches_80_percent_of_upper_bound"]


def test_format_report_names_missed_targets():
    summary = {f"{s}_{m}": 0.5 for s in ("mean", "std", "slice_mean") for m in ("dice", "sensitivity", "specificity")}
    report = {
        "config": {"num_cases": 6, "shape": [48, 48, 16], "grid": [8, 16, 16], "device": "cpu"},
        "num_test_studies": 1,
        "hu_window": [-750.0, -100.0],
        "methods": {m: summary for m in ("transunet_pseudo", "transunet_true", "hu_threshold")},
        "pseudo_masks": {"num_studies": 2, "mean_dice": 0.4, "std_dice": 0.1},
        "targets": {
            "beats_threshold_baseline": False,
            "fraction_of_upper_bound": 1.0,
            "reaches_80_percent_of_upper_bound": True,
        },
        "seconds": {"total": 12.0},
    }
    text = format_report(report)
    assert "| TransUNet (pseudo) beats the HU threshold | MISSED |" in text
    assert "met (100 %)" in text and "0.500 +- 0.500" in text and "| total | 12 |" in text
