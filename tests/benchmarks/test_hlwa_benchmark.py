"""Tests of the HLWA benchmark's model selection (common/benchmarks/hlwa.py, tools/benchmark_hlwa.py); the benchmark
itself trains for minutes and is run through tools/benchmark_hlwa.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.benchmarks.hlwa import DEFAULT_MODELS, MODELS, _parser, build_model, check_models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_default_models_are_the_side_by_side_three():
    assert check_models(DEFAULT_MODELS) == ["hlwa", "hlwa_modality_dropout", "segresnet"]
    assert check_models("segresnet, hlwa,hlwa_no_rcl") == ["segresnet", "hlwa", "hlwa_no_rcl"]
    assert check_models(("hlwa", "segresnet")) == ["hlwa", "segresnet"]  # what fire gives for "hlwa,segresnet"


def test_rcl_ablations_reach_the_bundle_loss_and_change_only_the_contrastive_term():
    # an override key the bundle config does not use would be accepted silently and train plain HLWA-UNet
    def loss_of(name):
        family, overrides = MODELS[name]
        assert family == "hlwa"
        return build_model(family, _parser("", "", [64] * 3, overrides))[1]

    plain, no_rcl, masked = loss_of("hlwa"), loss_of("hlwa_no_rcl"), loss_of("hlwa_masked_rcl")
    assert (plain.rcl_weight, plain.rcl.mode) == (0.1, "global")
    assert (no_rcl.rcl_weight, no_rcl.rcl.mode) == (0.0, "global")
    assert (masked.rcl_weight, masked.rcl.mode) == (0.1, "masked")
    assert plain.rcl.tau == no_rcl.rcl.tau == masked.rcl.tau


@pytest.mark.parametrize(
    "models, message",
    [
        ("hlwa,unet", "unknown model"),
        ("hlwa,segresnet,hlwa", "listed twice"),
        ("hlwa,hlwa_no_rcl", "must include ['segresnet']"),
    ],
)
def test_bad_model_lists_are_refused(models, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_models(models)


def test_cli_refuses_a_bad_model_list_in_one_line_before_writing_data(tmp_path):
    work = tmp_path / "bench"
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark_hlwa.py"), "--work_dir", str(work), "--models", "hlwa"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr
    assert "--models" in out.stderr and "segresnet" in out.stderr and "Traceback" not in out.stderr
    assert not work.exists()
