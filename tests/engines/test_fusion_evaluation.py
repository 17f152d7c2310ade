"""Tests of common/engines/fusion_evaluation.py (FusionMetricsSaver, summarize_rows)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from scipy import ndimage

from common.engines.fusion_evaluation import FusionMetricsSaver, summarize_rows
from common.metrics import fusion as fm
from common.networks.fusion_baselines import average_fusion


def _sources(seed: int, shape=(16, 16, 16)) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mri = ndimage.gaussian_filter(rng.random(shape), 1.0)
    pet = ndimage.gaussian_filter(rng.random(shape), 2.5)
    stack = np.stack([(x - x.min()) / (x.max() - x.min()) for x in (mri, pet)])
    return torch.from_numpy(stack).float()  # (2, D, H, W)


def _engine(cases: dict[str, torch.Tensor]) -> Engine:
    """An engine whose iterations look like a decollated MONAI evaluator's: lists of per-item dicts."""
    batches = [[{"case": name}] for name in cases]

    def step(engine, batch):
        sources = cases[batch[0]["case"]]
        return [{"pred": sources[:1].clone(), "label": sources}]  # the "network" copies the MRI

    return Engine(step), batches


def test_every_method_and_protocol_is_written_per_case(tmp_path):
    cases = {"c1": _sources(0), "c2": _sources(1)}
    engine, data = _engine(cases)
    saver = FusionMetricsSaver(str(tmp_path), method_name="net")
    saver.attach(engine)
    engine.run(data)

    with open(tmp_path / "fusion_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5 * 2  # cases x (net + 4 baselines) x protocols
    assert {(r["method"], r["protocol"]) for r in rows} == {
        (m, p) for m in ("net", "average", "maximum", "laplacian_pyramid", "guided_filter") for p in ("volume", "slice")
    }
    mri, pet = cases["c1"][0].double().numpy(), cases["c1"][1].double().numpy()
    row = next(r for r in rows if (r["case"], r["method"], r["protocol"]) == ("c1", "average", "volume"))
    assert float(row["ssim"]) == pytest.approx(fm.fusion_metrics(average_fusion(mri, pet), mri, pet)["ssim"])
    row = next(r for r in rows if (r["case"], r["method"], r["protocol"]) == ("c2", "net", "slice"))
    assert float(row["psnr_mri"]) == math.inf  # the copy of the MRI, on the middle axial slice
    assert float(row["ssim_pet"]) == pytest.approx(fm.ssim(cases["c2"][0, :, :, 8], cases["c2"][1, :, :, 8]))

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["method"] == "net" and summary["protocol"] == "volume"
    net_rows = [r for r in rows if r["method"] == "net" and r["protocol"] == "volume"]
    assert summary["ssim"] == pytest.approx(np.mean([float(r["ssim"]) for r in net_rows]))
    assert summary["psnr_mri"] is None  # an infinite mean is written as null
    assert summary["means"]["slice"]["average"]["qabf"] > 0
    # the copy of the MRI loses to the average on the ranking summary, whatever averaged PSNR says
    ranking = summary["ranking"]["volume"]
    assert ranking["average"]["mean_rank"] < ranking["net"]["mean_rank"]


def test_a_second_run_starts_from_an_empty_table(tmp_path):
    cases = {"c1": _sources(0)}
    engine, data = _engine(cases)
    saver = FusionMetricsSaver(str(tmp_path), protocols=("slice",), baselines=("average",))
    saver.attach(engine)
    engine.run(data)
    engine.run(data, max_epochs=1)
    assert len(saver.rows) == 2  # dc2fusion and average, once


def test_summarize_rows_skips_nan_and_keeps_infinity():
    rows = [
        {"case": "a", "method": "m", "protocol": "volume", "x": 1.0, "y": math.inf},
        {"case": "b", "method": "m", "protocol": "volume", "x": math.nan, "y": 2.0},
        {"case": "a", "method": "n", "protocol": "volume", "x": 3.0, "y": 1.0},
    ]
    means = summarize_rows(rows)
    assert means["volume"]["m"] == {"x": 1.0, "y": math.inf}
    assert means["volume"]["n"] == {"x": 3.0, "y": 1.0}


def test_bad_settings_and_shapes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown baselines"):
        FusionMetricsSaver(str(tmp_path), baselines=("wavelet",))
    with pytest.raises(ValueError, match="protocols"):
        FusionMetricsSaver(str(tmp_path), protocols=("single",))
    saver = FusionMetricsSaver(str(tmp_path))
    with pytest.raises(ValueError, match="sources must be"):
        saver.score_case("c", torch.zeros(1, 8, 8, 8), torch.zeros(3, 8, 8, 8))
    with pytest.raises(ValueError, match="fused must be"):
        saver.score_case("c", torch.zeros(1, 8, 8, 4), torch.zeros(2, 8, 8, 8))
