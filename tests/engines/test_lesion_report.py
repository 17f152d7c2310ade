"""Tests for common/engines/lesion_report.py and common/engines/slice_classes.py on a minimal ignite engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from common.data.pseudo_masks import load_slice_classes, slice_classes
from common.engines.lesion_report import LesionReportWriter, case_rows, write_lesion_report
from common.engines.slice_classes import SliceClassesWriter
from common.metrics.lesion import lesion_metrics
from common.metrics.segmentation import hd95, surface_dice

SPACING = (0.7, 0.8, 5.0)  # a CT grid: the reference's affine carries it
AFFINE = torch.diag(torch.tensor([*SPACING, 1.0]))


def case(seed: int) -> dict:
    """(1, 6, 6, 4) lung, reference (on an anisotropic CT grid) and a prediction that finds part of it."""
    rng = np.random.default_rng(seed)
    lung = np.zeros((1, 6, 6, 4), dtype=np.float32)
    lung[:, 1:5, 1:5, :3] = 1
    label = ((rng.random(lung.shape) > 0.6) & (lung > 0)).astype(np.float32)
    pred = label.copy()
    pred[:, 1, :, :] = 0  # misses some lesion
    pred[:, 4, 1, 0] = 1  # and adds a false positive
    label = MetaTensor(torch.as_tensor(label), affine=AFFINE)
    return {"case": f"s{seed}", "pred": torch.as_tensor(pred), "label": label, "lung": lung}


def run_engine(handler, items: list[dict]) -> Engine:
    """An engine whose every iteration outputs one decollated item, the way MONAI's evaluators do."""

    def step(engine, item):
        engine.state.batch = [{k: v for k, v in item.items() if k != "pred"}]
        return [{"pred": item["pred"]}]

    engine = Engine(step)
    handler.attach(engine)
    engine.run(items, max_epochs=1)
    return engine


def test_report_writer_files_match_the_metrics(tmp_path):
    items = [case(0), case(1), {**case(2), "label": None}]
    items[2].pop("label")  # a study without reference is skipped
    run_engine(LesionReportWriter(str(tmp_path), title="t"), items)
    with open(tmp_path / "metrics_per_volume.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["s0", "s1"]
    for r, item in zip(rows, items[:2]):
        vol, _ = lesion_metrics(item["pred"][0], item["label"][0], item["lung"][0])
        for k in ("dice", "sensitivity", "specificity", "lesion_fraction"):
            assert float(r[k]) == pytest.approx(vol[k])
        # distances in mm from the reference's spacing, not in voxels
        p, g = item["pred"][0].numpy(), item["label"][0].numpy()
        assert float(r["hd95_mm"]) == pytest.approx(hd95(p, g, SPACING), abs=1e-4)
        assert float(r["hd95_mm"]) != pytest.approx(hd95(p, g, (1.0, 1.0, 1.0)), abs=0.1)
        assert float(r["nsd"]) == pytest.approx(surface_dice(p, g, SPACING, 3.0), abs=1e-4)
    with open(tmp_path / "metrics_per_slice.csv") as f:
        slices = list(csv.DictReader(f))
    assert [int(r["slice"]) for r in slices if r["case"] == "s0"] == [0, 1, 2]  # slice 3 holds no lung
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["num_slices"] == 6
    assert summary["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert summary["mean_hd95_mm"] == pytest.approx(np.mean([float(r["hd95_mm"]) for r in rows]))
    assert summary["nsd_tolerance_mm"] == 3.0 and "std_nsd" in summary
    for metric in ("dice", "sensitivity", "specificity"):
        assert (tmp_path / f"{metric}_vs_lesion_fraction.png").stat().st_size > 1000


def test_write_report_with_undefined_values(tmp_path):
    row, slices = case_rows("empty", np.zeros((4, 4, 2)), np.zeros((4, 4, 2)), np.ones((4, 4, 2)), spacing=SPACING)
    summary = write_lesion_report([row], slices, str(tmp_path), plots=False, extra={"method": "x"})
    assert summary["mean_dice"] is None and summary["mean_specificity"] == 1.0 and summary["method"] == "x"
    text = (tmp_path / "metrics_per_volume.csv").read_text().splitlines()
    # NaN written as an empty cell; both masks empty: HD95 0, NSD 1 (BraTS convention)
    assert text[0].startswith("case,lesion_fraction,dice,sensitivity,specificity,hd95_mm,nsd,")
    assert text[1].startswith("empty,0.0,,,1.0,0.0,1.0,")
    assert not (tmp_path / "dice_vs_lesion_fraction.png").exists()


def test_case_rows_need_a_spacing():
    lesion = np.zeros((4, 4, 2))
    lesion[1:3, 1:3, 0] = 1
    with pytest.raises(ValueError, match="spacing is unknown"):
        case_rows("plain", np.zeros_like(lesion), lesion, np.ones_like(lesion))
    row, _ = case_rows("missed", np.zeros_like(lesion), lesion, np.ones_like(lesion), spacing=SPACING)
    assert (row["dice"], row["hd95_mm"], row["nsd"]) == (0.0, 374.0, 0.0)  # an empty prediction: the penalty


def test_slice_classes_writer_uses_dataset_wide_quartiles(tmp_path):
    burdens = {"b": np.array([0.0, 0.5, np.nan]), "a": np.array([0.1, 0.0, 0.3])}
    items = [{"case": c, "pred": torch.zeros(1), "slice_burden": b} for c, b in burdens.items()]
    path = tmp_path / "slice_classes.json"
    run_engine(SliceClassesWriter(str(path), grid=(3, 4, 4), seed=2), items)
    content = load_slice_classes(path, grid=(3, 4, 4))
    indices, labels = slice_classes(np.concatenate([burdens["a"], burdens["b"]]), seed=2)
    flat = np.asarray(content["cases"]["a"]["class"] + content["cases"]["b"]["class"])
    np.testing.assert_array_equal(flat[indices], labels)
    with pytest.raises(ValueError, match="processed twice"):
        run_engine(SliceClassesWriter(str(path), grid=(3, 4, 4)), [items[0], items[0]])
