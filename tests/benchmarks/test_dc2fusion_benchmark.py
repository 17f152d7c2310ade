"""Tests of common/benchmarks/dc2fusion.py at a trivially small budget (the benchmark itself is not a test)."""

from __future__ import annotations

import json
import math
import os

from common.benchmarks.dc2fusion import COPIES, format_report, run_benchmark
from common.metrics.fusion import BASELINES, RANKING_METRICS


def test_benchmark_runs_end_to_end_and_reports_every_method(tmp_path):
    results = run_benchmark(
        work_dir=str(tmp_path),
        num_cases=2,
        test_fraction=0.5,
        shape=(32, 32, 32),
        roi=32,
        steps=2,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(1, 2),
        head_channels=4,
        protocols=("slice",),
        threads=2,
        verbose=False,
    )
    assert results["steps"] == 2 and results["num_train"] == 1 and results["num_test"] == 1
    assert results["pad"] == 33  # ceil(224 mm / 6.81 mm)
    methods = results["means"]["slice"]
    assert set(methods) == {"dc2fusion", *BASELINES, *COPIES}
    assert math.isinf(methods["copy_mri"]["psnr_mri"]) and math.isfinite(methods["copy_mri"]["psnr_min"])
    ranking = results["ranking"]["slice"]
    assert all(f"rank_{m}" in r for r in ranking.values() for m in RANKING_METRICS)
    checks = results["checks"]["slice"]
    assert set(checks["dc2fusion_beats_baseline"]) == set(RANKING_METRICS)

    for name in ("benchmark_dc2fusion.json", "benchmark_dc2fusion.md", "model.pt", "panel.png"):
        assert os.path.isfile(tmp_path / name)
    saved = json.loads((tmp_path / "benchmark_dc2fusion.json").read_text())
    assert saved["means"]["slice"]["average"]["ssim"] == methods["average"]["ssim"]
    report = (tmp_path / "benchmark_dc2fusion.md").read_text()
    assert report.strip() == format_report(results)
    assert all(f"| {method} |" in report for method in methods)
