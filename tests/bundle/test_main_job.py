"""The README's first command ends in the main job: it must run a bundle end to end and leave a summary table and
a montage; a failing bundle is reported in the table and makes the job exit non-zero without stopping the rest."""

import json
import os
import shutil
import subprocess
import sys

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
    assert rows["example_bundle"]["metric"] == "mean_dice" and 0.0 <= rows["example_bundle"]["value"] <= 1.0
    assert "| example_bundle | ok | mean_dice |" in result.stdout
    with open(rows["example_bundle"]["montage"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (work / "summary.md").read_text().startswith("| bundle | status | metric | value | seconds |")
