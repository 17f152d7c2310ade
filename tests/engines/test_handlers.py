"""Tests for common/engines/handlers.py: SegmentationMetricsHandler files each metric per case and region, in mm from
each case's own affine, where MONAI's MetricsSaver and MetricsSummaryJSON find them; meta_from_engine names
MetricsSaver's rows by file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import MetricsSaver, from_engine

from common.engines.handlers import MetricsSummaryJSON, SegmentationMetricsHandler, meta_from_engine, output_items
from common.metrics.segmentation import METRIC_NAMES, hd95, lesion_wise, surface_dice


def case(name: str, spacing: tuple[float, float, float], shift: int) -> dict:
    """Two regions (C = 2) on a (12, 12, 8) grid of ``spacing``; the prediction is the reference shifted in z."""
    ref = np.zeros((2, 12, 12, 8), dtype=np.float32)
    ref[0, 2:8, 2:8, 2:5] = 1
    ref[1, 3:6, 3:6, 1:6] = 1
    pred = np.roll(ref, shift, axis=3)
    affine = torch.diag(torch.tensor([*spacing, 1.0]))
    meta = {"filename_or_obj": f"{name}.nii.gz"}
    return {"pred": MetaTensor(pred, affine=affine), "label": MetaTensor(ref, affine=affine, meta=meta)}


def test_handler_writes_each_metric_in_mm_per_case(tmp_path):
    cases = [case("a", (1.0, 1.0, 1.0), 1), case("b", (0.7, 0.7, 4.0), 1)]

    def step(engine, item):
        engine.state.batch = [{"image": item["label"]}]
        return [item]

    engine = Engine(step)
    SegmentationMetricsHandler(nsd_tolerance_mm=2.0, output_transform=from_engine(["pred", "label"])).attach(
        engine, "distances_and_lesions"
    )
    MetricsSaver(
        str(tmp_path),
        metrics=list(METRIC_NAMES),
        metric_details=list(METRIC_NAMES),
        batch_transform=meta_from_engine("image"),
    ).attach(engine)
    MetricsSummaryJSON(str(tmp_path), channel_names=["TC", "WT"]).attach(engine)
    engine.run(cases, max_epochs=1)

    # one value per case and region, the spacing of each case's own affine
    expected = np.zeros((2, 2, len(METRIC_NAMES)))
    for i, (c, spacing) in enumerate(zip(cases, [(1.0, 1.0, 1.0), (0.7, 0.7, 4.0)])):
        for r in range(2):
            p, g = c["pred"][r].numpy(), c["label"][r].numpy()
            lw = lesion_wise(p, g, spacing)
            expected[i, r] = [
                hd95(p, g, spacing),
                surface_dice(p, g, spacing, 2.0),
                lw.dice,
                lw.hd95_mm,
                lw.tp,
                lw.fn,
                lw.fp,
            ]
    assert expected[1, 0, 0] == pytest.approx(4.0)  # one slice off at 4 mm slices: not 1 voxel
    for k, name in enumerate(METRIC_NAMES):
        np.testing.assert_allclose(engine.state.metric_details[name].numpy(), expected[:, :, k], atol=1e-6)
        assert engine.state.metrics[name] == pytest.approx(expected[:, :, k].mean())
    assert "distances_and_lesions" not in engine.state.metrics  # each metric is filed under its own name

    with open(tmp_path / "hd95_mm_raw.csv") as f:
        rows = list(csv.reader(f))
    assert rows[1][0] == "a.nii.gz" and rows[2][0] == "b.nii.gz"
    assert [float(v) for v in rows[2][1:3]] == pytest.approx(expected[1, :, 0].tolist())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hd95_mm_TC"] == pytest.approx(expected[:, 0, 0].mean())
    assert summary["mean_hd95_mm"] == pytest.approx(expected[:, :, 0].mean())
    assert summary["lesion_dice_WT"] == pytest.approx(expected[:, 1, 2].mean()) and summary["num_cases"] == 2


def test_meta_from_engine_gives_each_cases_metadata_of_the_key():
    batch = [
        {"image": MetaTensor(torch.zeros(1, 2), meta={"filename_or_obj": f"{c}.nii.gz"}), "label": torch.ones(1)}
        for c in "ab"
    ]
    metas = meta_from_engine("image")(batch)
    assert [m["filename_or_obj"] for m in metas] == ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(KeyError):
        meta_from_engine("mri")(batch)


def test_output_items_keeps_the_named_losses():
    output = {"loss": 1.0, "g_loss": 1.0, "d_loss": 0.5, "fake": torch.zeros(2)}
    assert output_items(["g_loss", "d_loss"])(output) == {"g_loss": 1.0, "d_loss": 0.5}
    with pytest.raises(KeyError):
        output_items(["recon_loss"])(output)
