"""The MedSegDiff sampler benchmark at a trivially small budget: it trains, samples every setting and writes its table."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from common.benchmarks.medsegdiff import run_benchmark, tumour_slab, volume_dice


def test_tumour_slab_and_volume_dice():
    label = torch.zeros(1, 4, 4, 10)
    label[0, 1:3, 1:3, 6] = 1
    label[0, 1, 1, 7] = 1
    assert tumour_slab(label, 3) == slice(5, 8)
    assert tumour_slab(label, 20) == slice(0, 10)
    assert tumour_slab(torch.zeros(1, 2, 2, 9), 3) == slice(3, 6)  # no tumour: the middle
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[:2], b[1:3] = 1, 1
    assert volume_dice(a, b) == 0.5 and volume_dice(np.zeros(3), np.zeros(3)) == 1.0


def test_benchmark_runs_every_setting_and_writes_its_table(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = run_benchmark(
            work_dir=str(tmp_path),
            num_cases=4,
            shape=(32, 32, 16),
            roi=16,
            channels=(8, 16),
            iterations=2,
            slices_per_volume=2,
            eval_slices=1,
            num_test=1,
            ensembles=(2,),
            settings=(("ddpm", 1000), ("ddim", 10)),
            fusions=("mean",),  # STAPLE would load ITK (seconds); it is tested in tests/data/test_ensemble_fusion.py
            threads=1,
        )
    finally:
        torch.set_num_threads(threads)
    rows = results["rows"]
    assert list(rows) == ["ddpm-1000 x2", "ddim-10 x2"]
    for row in rows.values():
        assert row["slices"] == 1 and row["seconds_per_slice"] > 0
        assert 0.0 <= row["mean_dice_mean"] <= 1.0 and 0.0 <= row["mean_dice_single"] <= 1.0
    assert rows["ddpm-1000 x2"]["speedup_vs_ddpm1000"] == 1.0
    assert rows["ddim-10 x2"]["speedup_vs_ddpm1000"] > 5  # 100 times fewer network calls
    assert results["training"]["iterations"] >= 2
    with open(tmp_path / "benchmark_medsegdiff.json") as f:
        assert json.load(f)["rows"].keys() == rows.keys()
    table = (tmp_path / "benchmark_medsegdiff.md").read_text()
    assert "| DDPM | 1000 | 2 |" in table and "| DDIM | 10 | 2 |" in table
    assert os.path.isfile(tmp_path / "datalist.json")
