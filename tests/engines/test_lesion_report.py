"""Tests for common/engines/lesion_report.py and common/engines/slice_classes.py on a minimal ignite engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from common.data.pseudo_masks import load_slice_classes, slice_classes
from common.engines.lesion_report import LesionReportWriter, case_rows, write_lesion_report
from common.engines.slice_classes import SliceClassesWriter
from common.metrics.lesion import lesion_metrics


def case(seed: int) -> dict:
    """(1, 6, 6, 4) lung, reference and a prediction that finds part of it."""
    rng = np.random.default_rng(seed)
    lung = np.zeros((1, 6, 6, 4), dtype=np.float32)
    lung[:, 1:5, 1:5, :3] = 1
    label = ((rng.random(lung.shape) > 0.6) & (lung > 0)).astype(np.float32)
    pred = label.copy()
    pred[:, 1, :, :] = 0  # misses some lesion
    pred[:, 4, 1, 0] = 1  # and adds a false positive
    return {"case": f"s{seed}", "pred": torch.as_tensor(pred), "label": torch.as_tensor(label), "lung": lung}


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
    with open(tmp_path / "metrics_per_slice.csv") as f:
        slices = list(csv.DictReader(f))
    assert [int(r["slice"]) for r in slices if r["case"] == "s0"] == [0, 1, 2]  # slice 3 holds no lung
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["num_slices"] == 6
    assert summary["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    for metric in ("dice", "sensitivity", "specificity"):
        assert (tmp_path / f"{metric}_vs_lesion_fraction.png").stat().st_size > 1000


def test_write_report_with_undefined_values(tmp_path):
    row, slices = case_rows("empty", np.zeros((4, 4, 2)), np.zeros((4, 4, 2)), np.ones((4, 4, 2)))
    summary = write_lesion_report([row], slices, str(tmp_path), plots=False, extra={"method": "x"})
    assert summary["mean_dice"] is None and summary["mean_specificity"] == 1.0 and summary["method"] == "x"
    text = (tmp_path / "metrics_per_volume.csv").read_text().splitlines()
    assert text[1].startswith("empty,0.0,,,1.0")  # NaN written as an empty cell
    assert not (tmp_path / "dice_vs_lesion_fraction.png").exists()


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
