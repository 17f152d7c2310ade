"""Tests of the speed benchmark (common/benchmarks/speed.py, tools/benchmark_speed.py) on tiny sizes; the real
benchmark runs for hours on a CPU and is run through tools/benchmark_speed.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from common.benchmarks.speed import NETWORKS, applicable, count_flops, measure, parse_names

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flop_counter_counts_a_known_network():
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    assert count_flops(lambda: linear(x)) == 2 * 5 * 8 * 4
    # backward: gradients of the input and of the weight, each a matmul of the same size
    assert count_flops(lambda: linear(x).sum().backward()) == 3 * 2 * 5 * 8 * 4


def test_switches_apply_only_where_the_network_has_them():
    assert applicable("hlwa", "brain", "train", "sdpa") and applicable("swinunetr", "brain", "train", "sdpa")
    assert not applicable("segresnet", "brain", "train", "sdpa")
    assert applicable("dc2fusion", "roi", "train", "checkpointing")
    assert not applicable("dc2fusion", "roi", "infer", "checkpointing")  # training only
    assert not applicable("dc2fusion", "brain", "train", "shipped")  # MRI + PET, not the 4-channel brain crop
    assert not applicable("segresnet", "roi", "train", "shipped")  # no bundle ROI
    with pytest.raises(ValueError, match="unknown network"):
        parse_names("hlwa,unet", NETWORKS, "network")


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_network_trains_and_infers_at_tiny_size(name):
    inp = "brain" if NETWORKS[name].brain else "roi"
    train = measure(name, inp, "train", tiny=True, repeats=1)
    assert train["median_s"] > 0 and train["calls"] == 1 and train["peak_gb"] > 0
    infer = measure(name, inp, "infer", tiny=True, repeats=1)
    # the brain networks infer by sliding window over the whole (tiny) volume: several windows
    assert infer["calls"] > 1 if inp == "brain" else infer["calls"] == 1
    assert measure(name, inp, "train", switch="flops", tiny=True)["flops_per_call"] > 0


def test_bf16_and_checkpointing_switches_run_a_training_step():
    bf16 = measure("hlwa", "brain", "train", switch="bf16", tiny=True, repeats=1, profile=True)
    assert bf16["median_s"] > 0 and "attention_kernels" in bf16
    assert measure("dc2fusion", "roi", "train", switch="checkpointing", tiny=True, repeats=1)["median_s"] > 0


def test_cli_runs_a_subset_and_writes_the_report(tmp_path):
    work = tmp_path / "speed"
    cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark_speed.py"), "--work_dir", str(work), "--tiny"]
    cmd += ["--networks", "hlwa,segresnet", "--inputs", "brain", "--modes", "train", "--switches", "sdpa,bf16"]
    cmd += ["--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    # progress: peaks (float32, bfloat16), FLOPs per network, then hlwa x (shipped, sdpa, bf16), segresnet x 2
    assert "[1/9] measured matmul peak, float32" in out.stdout and "[9/9] segresnet brain train bf16" in out.stdout
    results = json.loads((work / "speed.json").read_text())
    variants = [(r["network"], r["switch"]) for r in results["rows"]]
    assert variants == [("hlwa", "shipped"), ("hlwa", "sdpa"), ("hlwa", "bf16"), ("segresnet", "shipped"),
                        ("segresnet", "bf16")]  # fmt: skip
    for row in results["rows"]:
        assert "error" not in row, row
        assert row["flops"] > 0 and 0 < row["fraction_of_peak"] < 1
        assert row["flops_per_s"] == pytest.approx(row["flops"] / row["median_s"])
    assert results["rows"][0]["speedup"] == 1.0 and results["peak_flops"]["bfloat16"] > 0
    table = (work / "speed.md").read_text()
    assert "| HLWA-UNet | brain | train | explicit attention |" in table and "bf16 autocast" in table


def test_cli_refuses_an_unknown_switch_in_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark_speed.py"), "--work_dir", str(tmp_path / "w")]
    out = subprocess.run(cmd + ["--switches", "sdpa,fp8"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2 and "--switches" in out.stderr and "fp8" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


def test_one_child_measures_a_list_and_reports_each_failure_in_place():
    """The CUDA path runs every measurement in one child (peaks are reset per measurement there)."""
    from common.benchmarks.speed import _run_child

    good = {"network": "segresnet", "inp": "brain", "mode": "infer", "switch": "shipped", "tiny": True, "repeats": 1}
    bad = {**good, "network": "no_such_network"}
    results = _run_child([good, bad, {**good, "switch": "flops"}], timeout_s=600)
    assert len(results) == 3
    assert results[0]["calls"] > 1 and results[2]["flops_per_call"] > 0
    assert results[1]["error"].startswith("KeyError")
