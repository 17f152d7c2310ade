"""The MedSegDiff benchmark (common/benchmarks/medsegdiff.py): its sampling is right, its models see the same data,
and one tiny run goes from training to the model card."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from monai.transforms import Orientation, Resize
from torch import nn

from common.benchmarks.medsegdiff import (
    BUNDLE,
    CARD_END,
    CARD_START,
    MODELS,
    benchmark_parser,
    check_models,
    make_scheduler,
    prepare_data,
    run_benchmark,
    segment_volume,
    train_run,
    update_model_card,
    volume_dice,
)
from common.engines.diffusion import mask_to_signal

TINY = {
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, True],
    "network_def#num_heads": 2,
    "network_def#norm_num_groups": 4,
    "network_def#ff_parser_size": [16, 16],
    "roi_size": [16, 16],
    "slices_per_volume": 2,
}


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp("medsegdiff_benchmark"))
    return work_dir, prepare_data(work_dir, num_cases=4, num_test=1, shape=(32, 32, 16), seed=0, phantom="basic")


class MaskOracle(nn.Module):
    """Predicts the noise that makes ``x0_hat`` equal the mask written into the image's first channel (> 0), using
    the *training* schedule's ``abar``: a sampler with other alphas, or one that does not pass the image, fails."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod
        self.anchor = nn.Parameter(torch.zeros(()))  # the benchmark reads the device from the parameters

    def forward(self, x, timesteps, context):
        target = mask_to_signal((context[:, :1] > 0).float())
        abar = self.alphas_cumprod.to(x.device)[timesteps.long()].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()


class Thresholder(nn.Module):
    """Deterministic 'network': logits +-10 from the sign of the image's first channel."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, image):
        return torch.where(image[:, :1] > 0, 10.0, -10.0)


def test_volume_dice():
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[:2], b[1:3] = 1, 1
    assert volume_dice(a, b) == 0.5 and volume_dice(np.zeros(3), np.zeros(3)) == 1.0


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 1000), ("ddim", 10), ("dpm_solver", 10)])
def test_benchmark_sampling_recovers_the_mask_an_oracle_denoiser_knows(sampler, steps, data):
    """Through the benchmark's own path (its schedulers, whole-volume inferer, STAPLE, the bundle's Invertd), every
    sampler must give back exactly the mask the oracle encodes, i.e. the same Dice as thresholding that mask."""
    work_dir, (data_dir, datalist) = data
    parser = benchmark_parser(data_dir, datalist, "medsegdiff", 0, work_dir, TINY)
    volume = dict(parser.get_parsed_content("validate#dataset")[0])
    image = volume["image"].clone()
    label = Resize(image.shape[1:], mode="nearest")(Orientation("RAS")(volume["label"]))  # on the image's grid
    brain = image.abs().amax(dim=0) > 0
    image[0] = torch.where(brain & (label[0] > 0), 1.0, torch.where(brain, -0.5, 0.0))
    volume["image"] = image
    reference, _ = segment_volume(Thresholder(), volume, parser, "deterministic")
    assert 0.5 < reference <= 1.0  # the mask survives the round trip to the roi and back
    training = parser.get_parsed_content("noise_scheduler")
    # an oracle corrects any chain that ends at t = 0, so the schedule itself is checked too
    torch.testing.assert_close(make_scheduler(sampler, parser).alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
    oracle = MaskOracle(training.alphas_cumprod)
    for ensemble in (1, 3):
        dice, seconds = segment_volume(oracle, volume, parser, "diffusion", sampler, steps, ensemble)
        assert dice == pytest.approx(reference, abs=1e-9) and seconds > 0


def test_models_of_a_seed_train_on_the_same_batches(data):
    """The fingerprints of the first batches agree between the diffusion and the deterministic model of a seed
    (same data, crops, augmentation, order), and differ between seeds."""
    work_dir, data_paths = data
    settings = {
        "budget_s": 60.0,
        "curve_points": 1,
        "max_steps": 2,
        "batch_size": 64,
        "device": "cpu",
        "overrides": {"device": "$torch.device('cpu')", **TINY},
    }
    runs = {
        (model, seed): train_run(model, seed, data_paths, work_dir, settings, lambda _msg: None)
        for model, seed in (("medsegdiff", 0), ("deterministic", 0), ("medsegdiff", 1))
    }
    first = runs["medsegdiff", 0]["data_fingerprint"]
    assert len(first) == 2 and runs["deterministic", 0]["data_fingerprint"] == first
    assert runs["medsegdiff", 1]["data_fingerprint"] != first
    assert runs["medsegdiff", 0]["parameters"] == runs["deterministic", 0]["parameters"]  # the same backbone
    assert runs["deterministic", 0]["kind"] == "deterministic" and runs["medsegdiff", 0]["steps"] == 2
    assert os.path.isfile(runs["deterministic", 0]["weights"])


def test_check_models():
    assert check_models("medsegdiff,deterministic") == ["medsegdiff", "deterministic"]
    with pytest.raises(ValueError, match="unknown"):
        check_models(["medsegdiff", "unet"])
    with pytest.raises(ValueError, match="must include"):
        check_models(["deterministic"])
    assert set(MODELS) == {"medsegdiff", "medsegdiff_residual_fusion", "deterministic"}


def test_tiny_benchmark_writes_report_and_model_card(tmp_path):
    results = run_benchmark(
        work_dir=str(tmp_path / "bench"),
        num_cases=4,
        num_test=1,
        shape=(32, 32, 16),
        models=("medsegdiff", "deterministic"),
        seeds=(0,),
        budget_s=30.0,
        max_steps=2,
        curve_points=2,
        ddpm_cases=1,
        overrides=TINY,
    )
    assert results["data_identical_across_models"]
    rows = results["sampler_table"]
    assert list(rows) == ["ddpm-1000", "ddim-10", "dpm_solver-10"]
    assert rows["ddpm-1000"]["speedup_vs_ddpm1000"] == 1.0 and rows["ddim-10"]["speedup_vs_ddpm1000"] > 10
    assert set(results["models"]) == {"medsegdiff", "deterministic"}
    assert "medsegdiff - deterministic" in results["paired"]
    assert results["eval_metrics"]["note"].startswith("SYNTHETIC")
    report = tmp_path / "bench" / "benchmark_medsegdiff.json"
    assert report.is_file() and (tmp_path / "bench" / "benchmark_medsegdiff_learning_curve.png").is_file()
    # rerunning reuses every finished piece (resumable): same figures, no training
    again = run_benchmark(
        work_dir=str(tmp_path / "bench"),
        num_cases=4,
        num_test=1,
        shape=(32, 32, 16),
        models=("medsegdiff", "deterministic"),
        seeds=(0,),
        budget_s=30.0,
        max_steps=2,
        curve_points=2,
        ddpm_cases=1,
        overrides=TINY,
    )
    assert again["models"] == results["models"]

    bundle = tmp_path / "bundle"
    for folder in ("docs", "configs"):
        shutil.copytree(os.path.join(BUNDLE, folder), bundle / folder)
    paths = update_model_card(str(report), str(bundle))
    card = (bundle / "docs" / "README.md").read_text()
    section = card[card.index(CARD_START) : card.index(CARD_END)]
    assert "| MedSegDiff (paper fusion) |" in section and "| DDPM | 1000 |" in section
    assert f"{results['models']['medsegdiff']['dice']['mean']:.3f}" in section
    assert os.path.isfile(paths["png"])
    with open(bundle / "configs" / "metadata.json") as f:
        assert json.load(f)["eval_metrics"] == results["eval_metrics"]
