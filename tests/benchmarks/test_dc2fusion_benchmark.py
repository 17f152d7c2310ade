"""Tests of common/benchmarks/dc2fusion.py at a trivially small budget (the benchmark itself is not a test)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from common.benchmarks import dc2fusion as bench
from common.benchmarks.budget import train_with_budget
from common.benchmarks.report import bundle_train_parser
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_synthetic_dataset
from common.losses.fusion import DC2FusionLoss
from common.networks.fusion_baselines import BASELINES

TINY = {
    "num_cases": 3,
    "test_fraction": 0.34,
    "shape": (32, 32, 32),
    "roi": 32,
    "embed_dim": 8,
    "depths": (1, 1),
    "num_heads": (1, 2),
    "protocols": ("volume", "slice"),
    "threads": 1,
    "verbose": False,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("bench")
    out = bench.run_benchmark(
        work_dir=str(work_dir), steps=3, checkpoint_steps=(1,), seeds=(1, 2), loss_optimum_steps=2, **TINY
    )
    return work_dir, out


def test_every_method_is_scored_per_held_out_pair_with_mean_and_sd(results):
    work_dir, out = results
    assert out["synthetic"] is True and out["num_train"] == 2 and out["num_test"] == 1
    assert out["pad"] == 33  # ceil(224 mm / 6.81 mm)
    runs = ["dc2fusion_paper_seed1", "dc2fusion_paper_seed2"]
    for protocol in ("volume", "slice"):
        methods = out["stats"][protocol]
        assert set(methods) == {*runs, *BASELINES, *bench.COPIES, bench.LOSS_OPTIMUM}
        mean, sd = methods["copy_mri"]["psnr_mri"]
        assert math.isinf(mean) and math.isnan(sd)  # one held-out pair: no sd
        assert math.isfinite(methods["copy_mri"]["psnr_min"][0])
        assert bench.LOSS_OPTIMUM not in out["winners"][protocol].values()
        assert not set(bench.COPIES) & set(out["winners"][protocol].values())
        assert [t["metric"] for t in out["targets"][protocol]] == ["ssim", "qabf", "mi", "psnr_min"]
        assert all(set(t["met_per_row"]) == set(runs) for t in out["targets"][protocol])
    average = [r for r in out["rows"] if r["method"] == "average" and r["protocol"] == "volume"]
    assert out["stats"]["volume"]["average"]["ssim"][0] == pytest.approx(np.mean([r["ssim"] for r in average]))


def test_each_seed_trains_the_step_budget_through_the_bundle_trainer_and_the_schedule_ends_at_zero(results):
    work_dir, out = results
    for run in out["training"].values():
        assert run["steps"] == 3 and run["stopped_by"] == "steps" and run["budget"]["max_steps"] == 3
        assert [c["steps"] for c in run["checkpoints"]] == [1, 3]  # the learning curve mark, then the end
        assert set(run["checkpoints"][0]["metrics"]) == {"ssim", "qabf", "mi", "psnr_min"}
        assert run["learning_rate_last"] == pytest.approx(0.0, abs=1e-12)  # poly decay over the step budget
        seed = run["seed"]
        assert os.path.isfile(work_dir / f"model_paper_seed{seed}.pt")
        assert os.path.isfile(work_dir / f"panel_paper_seed{seed}.png")
    first, second = (out["training"][f"dc2fusion_paper_seed{s}"]["loss_first"] for s in (1, 2))
    assert first != second  # the seeds are different runs
    saved = json.loads((work_dir / "benchmark_dc2fusion.json").read_text())
    assert saved["targets"]["volume"][0]["threshold"] == out["targets"]["volume"][0]["threshold"]
    report = (work_dir / "benchmark_dc2fusion.md").read_text()
    assert report.strip() == bench.format_report(out)
    assert all(f"| {method} |" in report for method in out["stats"]["volume"])


def test_a_second_run_reuses_every_finished_run_and_new_settings_train_again(results, monkeypatch):
    work_dir, out = results

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench, "train_with_budget", no_training)
    monkeypatch.setattr(bench, "loss_optimal_fusion", no_training)
    again = bench.run_benchmark(
        work_dir=str(work_dir), steps=3, checkpoint_steps=(1,), seeds=(1, 2), loss_optimum_steps=2, **TINY
    )
    assert again["stats"] == out["stats"]
    with pytest.raises(AssertionError, match="trained again"):  # another budget is another run
        bench.run_benchmark(work_dir=str(work_dir), steps=4, seeds=(1,), loss_optimum_steps=2, **TINY)


def test_step_budget_overrides_decay_the_bundle_learning_rate_per_step(tmp_path):
    data_dir = str(tmp_path / "data")
    write_synthetic_dataset("adni_pairs", data_dir, num_cases=2, shape=[32, 32, 32], seed=0, progress=False)
    datalist = str(tmp_path / "datalist.json")
    save_datalist(build_datalist("adni_pairs", data_dir, val_fraction=0.0, test_fraction=0.0, progress=False), datalist)
    overrides = {
        "roi_size": [32] * 3,
        "pad_size": [33] * 3,
        "device": "cpu",
        "network_def#embed_dim": 8,
        "network_def#depths": [1, 1],
        "network_def#num_heads": [1, 2],
        **bench.step_budget_overrides(steps=4, learning_rate=0.01),
    }
    parser = bundle_train_parser(bench.BUNDLE, data_dir, datalist, overrides)
    assert parser[bench.LR_HANDLER]["_target_"] == "LrScheduleHandler"  # the handler the benchmark keeps
    rates = []

    def learning_rate(p, trainer):
        rates.append(p.get_parsed_content("optimizer").param_groups[0]["lr"])
        return {}

    torch.set_num_threads(1)
    train_with_budget(
        parser,
        model="dc2fusion",
        max_steps=4,
        checkpoint_steps=(1, 2, 3),
        evaluate=learning_rate,
        keep_handlers=[bench.LR_HANDLER],
        progress=None,
    )
    # two training subjects: an epoch-level schedule would still be at 0.01 after step 1 and change every 2 steps
    assert rates == pytest.approx([0.01 * (1 - k / 4) ** 0.9 for k in (1, 2, 3, 4)], rel=1e-9)


def test_judge_targets_beats_every_named_baseline_and_within_a_margin_of_the_average():
    means = {
        "average": {"ssim": 0.80, "qabf": 0.70, "mi": 1.0, "psnr_min": 27.0},
        "maximum": {"ssim": 0.75, "qabf": 0.80, "mi": 1.5, "psnr_min": 22.0},
        "laplacian_pyramid": {"ssim": 0.60, "qabf": 0.72, "mi": 1.1, "psnr_min": 23.0},
        "guided_filter": {"ssim": 0.99, "qabf": 0.99, "mi": 9.0, "psnr_min": 30.0},  # reported, not targeted
        "net_a": {"ssim": 0.81, "qabf": 0.80, "mi": 1.6, "psnr_min": 26.0},
        "net_b": {"ssim": 0.85, "qabf": 0.90, "mi": 1.2, "psnr_min": 25.9},
    }
    verdicts = {t["metric"]: t for t in bench.judge_targets(means, ["net_a", "net_b"])}
    assert verdicts["ssim"]["reference"] == "average" and verdicts["ssim"]["met"]
    assert verdicts["qabf"]["reference"] == "maximum"
    assert verdicts["qabf"]["met_per_row"] == {"net_a": False, "net_b": True}  # a tie does not beat
    assert not verdicts["qabf"]["met"]  # every seed must meet it
    assert verdicts["mi"]["met_per_row"] == {"net_a": True, "net_b": False}
    assert verdicts["psnr_min"]["threshold"] == pytest.approx(26.0)
    assert verdicts["psnr_min"]["met_per_row"] == {"net_a": True, "net_b": False}


def test_loss_optimum_lowers_the_loss_below_the_average_and_stays_at_an_optimum():
    grid = np.linspace(-1, 1, 24)
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    head = (x**2 + y**2 + z**2 < 0.7).astype(np.float64)
    mri = head * (0.5 + 0.3 * np.sin(8 * x) * np.cos(6 * y))
    pet = head * np.exp(-((x - 0.2) ** 2 + y**2 + z**2) / 0.1)
    torch.set_num_threads(1)
    paper = DC2FusionLoss(ncc_kernel_size=5, ssim_win=7)  # weights 2/1 for MRI/PET

    def loss_of(fused):
        t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
        return float(paper(t(fused), t(mri), t(pet)))

    fused, loss = bench.loss_optimal_fusion(mri, pet, paper, steps=40)
    assert fused.shape == mri.shape and loss == pytest.approx(loss_of(fused), rel=1e-5)
    assert loss < loss_of((mri + pet) / 2) - 0.05
    textured = 0.5 + 0.3 * np.sin(8 * x) * np.cos(6 * y)  # no flat window, where MONAI's LNCC is 0
    same, loss = bench.loss_optimal_fusion(textured, textured, paper, steps=20)
    np.testing.assert_allclose(same, textured, atol=0.02)  # F = MRI = PET is the optimum: Adam only jitters there
    assert loss < 0.02 < loss_of((mri + pet) / 2)
