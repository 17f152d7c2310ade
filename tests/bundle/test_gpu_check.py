"""tools/gpu_check.sh and common/bundle/device_check.py: the environment check, usage errors, and the CPU fallback
(``--device cpu --tiny``) end to end. The CUDA run itself needs a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.bundle.device_check import check_environment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")


def test_environment_check_reports_missing_and_mismatched_requirements(tmp_path):
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text(
        "[options]\ninstall_requires =\n    torch>=2.4\n    numpy<1.0\n    no-such-package-xyz>=1.0\n"
        "[options.extras_require]\ndev =\n    pytest>=7.4\n    no-such-dev-tool>=1\n"
    )
    env = check_environment(str(setup_cfg))
    by_name = {p["name"]: p for p in env["packages"]}
    assert by_name["torch"]["ok"] and by_name["pytest"]["ok"]
    assert not by_name["numpy"]["ok"] and by_name["numpy"]["installed"]  # installed, but not numpy < 1.0
    assert by_name["no-such-package-xyz"]["installed"] is None
    assert env["missing"][0].startswith("numpy<1.0 (installed ") and env["missing"][1] == "no-such-package-xyz>=1.0"
    assert env["missing_dev"] == ["no-such-dev-tool>=1"] and not by_name["pytest"]["needed"]
    assert env["torch"]["version"] and env["torch"]["cuda_available"] in (True, False)
    assert check_environment()["missing"] == []  # this environment is complete


@pytest.mark.parametrize(
    "args, message", [(["--device", "gpu"], "--device must be cuda or cpu"), (["--fast"], "unknown option")]
)
def test_bad_usage_exits_2_before_running_anything(tmp_path, args, message):
    out = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_fallback_runs_every_bundle_and_the_benchmark_into_one_report(tmp_path):
    out_dir = tmp_path / "check"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", SCRIPT, str(out_dir), "--device", "cpu", "--tiny", "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    report = json.loads((out_dir / "gpu_check.json").read_text())
    failures = [r for b in report["bundles"] for r in b["rows"] if r["status"] != "ok"]
    assert proc.returncode == 0, (failures, proc.stdout[-3000:], proc.stderr[-3000:])
    stages = {(r["bundle"], r["stage"]) for b in report["bundles"] for r in b["rows"]}
    for bundle in os.listdir(os.path.join(REPO, "bundles")):
        assert (bundle, "train") in stages and (bundle, "inference_full_volume") in stages
    # the full-size volume's outputs are on its grid (checked against the input's shape and affine)
    assert all(r["outputs_checked"] >= 1 for b in report["bundles"] for r in b["rows"] if "inference" in r["stage"])
    table = (out_dir / "gpu_check.md").read_text()
    assert "## Speed benchmark" in table and "| HLWA-UNet | brain | train | explicit attention |" in table
    assert (out_dir / "speed" / "speed.json").is_file() and "--amp True" in (
        out_dir / "bundles" / "brats_mri_hlwa_segmentation" / "logs" / "train.log"
    ).read_text().splitlines()[0]
