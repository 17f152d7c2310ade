"""The README's first command ends in the main job: it must run a bundle end to end and leave a summary table and
a montage; a failing bundle is reported in the table and makes the job exit non-zero without stopping the rest."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from common.bundle.main_job import format_table
from common.bundle.pipeline import BundleRunError, read_summary_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "tests", "example_bundle")


def test_main_job_on_the_example_bundle(tmp_path):
    broken = tmp_path / "broken_bundle"
    shutil.copytree(EXAMPLE, broken)
    (broken / "configs" / "train.json").write_text("{ not json")
    work = tmp_path / "main"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "main_job.py"),
        "--bundles",
        f"{EXAMPLE},{broken}",
        "--work_dir",
        str(work),
        "--profile",
        "test",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # the broken bundle fails, the job says so
    summary = json.loads((work / "summary.json").read_text())
    rows = {r["bundle"]: r for r in summary["bundles"]}
    assert rows["example_bundle"]["status"] == "ok" and rows["broken_bundle"]["status"] == "FAILED"
    metrics = rows["example_bundle"]["metrics"]
    assert list(metrics) == ["mean_dice", "mean_hd95_mm"] and 0.0 <= metrics["mean_dice"] <= 1.0
    assert math.isfinite(metrics["mean_hd95_mm"]) and metrics["mean_hd95_mm"] >= 0.0
    header = "| bundle | status | mean_dice | mean_hd95_mm | seconds |"
    assert header in result.stdout and "| example_bundle | ok | " in result.stdout
    with open(rows["example_bundle"]["montage"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (work / "summary.md").read_text().startswith(header)


def test_table_has_a_column_per_summary_metric():
    rows = [
        {"bundle": "seg", "status": "ok", "metrics": {"mean_dice": 0.8, "mean_hd95_mm": 12.5}, "seconds": 3.0},
        {"bundle": "fusion", "status": "ok", "metrics": {"ssim": None}, "seconds": 1.0},
        {"bundle": "broken", "status": "FAILED", "metrics": {}, "seconds": 0.5},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| bundle | status | mean_dice | mean_hd95_mm | ssim | seconds |"
    assert lines[2] == "| seg | ok | 0.8000 | 12.5000 |  | 3.0 |"
    assert lines[3] == "| fusion | ok |  |  | n/a | 1.0 |" and lines[4] == "| broken | FAILED |  |  |  | 0.5 |"


def test_summary_metrics_are_read_in_order_and_a_missing_one_fails(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"mean_hd95_mm": 4.5, "mean_dice": 0.7, "mean_nsd": None}))
    assert list(read_summary_metrics(str(path), ["mean_dice", "mean_hd95_mm", "mean_nsd"]).items()) == [
        ("mean_dice", 0.7),
        ("mean_hd95_mm", 4.5),
        ("mean_nsd", None),
    ]
    with pytest.raises(BundleRunError, match="mean_hd95"):
        read_summary_metrics(str(path), ["mean_dice", "mean_hd95"])
