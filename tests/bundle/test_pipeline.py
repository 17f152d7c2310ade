"""Tests for common/bundle/pipeline.py: what a stage is run with (the main job, the harness and the device check all
build it with stage_run_overrides)."""

from __future__ import annotations

import os

import pytest

from common.bundle.pipeline import stage_run_overrides


def test_stage_run_overrides_data_checkpoint_then_profile():
    stage = {
        "name": "evaluate",
        "uses_checkpoint": "ckpt_path",
        "overrides": {"num_workers": 0, "device": "cuda"},
        "test": {"roi_size": [16, 16, 16], "num_workers": 1},
        "demo": {"roi_size": [64, 64, 64]},
    }
    out = stage_run_overrides(stage, "test", "/data/set", "/data/set.json", "/work/evaluate", "/work/ckpt", "cpu")
    assert out == {
        "dataset_dir": "/data/set",
        "data_list_file_path": "/data/set.json",
        "output_dir": "/work/evaluate",
        "ckpt_dir": "/work/ckpt",
        "device": "cuda",  # the stage's own overrides win over the run's
        "ckpt_path": os.path.join("/work/ckpt", "model.pt"),
        "num_workers": 1,  # then the profile's
        "roi_size": [16, 16, 16],
    }
    train = {"name": "train", "trains": True}
    assert "ckpt_path" not in stage_run_overrides(train, "demo", "d", "d.json", "o", "c", "cpu")
    with pytest.raises(ValueError, match="profile must be one of"):
        stage_run_overrides(train, "full", "d", "d.json", "o", "c", "cpu")
