"""Tests of the HLWA benchmark's model selection (common/benchmarks/hlwa.py, tools/benchmark_hlwa.py); the benchmark
itself trains for minutes and is run through tools/benchmark_hlwa.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.benchmarks.hlwa import DEFAULT_MODELS, MODELS, check_models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_default_models_are_the_side_by_side_three():
    assert check_models(DEFAULT_MODELS) == ["hlwa", "hlwa_modality_dropout", "segresnet"]
    assert check_models("segresnet, hlwa,hlwa_no_rcl") == ["segresnet", "hlwa", "hlwa_no_rcl"]


def test_rcl_ablations_change_only_the_contrastive_term():
    assert MODELS["hlwa_no_rcl"] == ("hlwa", {"rcl_weight": 0.0})
    assert MODELS["hlwa_masked_rcl"] == ("hlwa", {"rcl_mode": "masked"})


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
