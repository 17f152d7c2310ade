"""Tests of the budget trainer every benchmark uses (common/benchmarks/budget.py), on the example bundle."""

from __future__ import annotations

import json
import os
import time

import pytest

from common.benchmarks.budget import cached_run, train_with_budget
from common.benchmarks.report import bundle_train_parser
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "tests", "example_bundle")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    write_synthetic_dataset("brats2021", str(root / "data"), num_cases=4, shape=[32, 32, 32], seed=0)
    datalist = str(root / "datalist.json")
    save_datalist(build_datalist("brats2021", str(root / "data"), seed=0, val_fraction=0.25, progress=False), datalist)
    return str(root / "data"), datalist, root


def _parser(data, **overrides):
    dataset_dir, datalist, root = data
    return bundle_train_parser(
        EXAMPLE,
        dataset_dir,
        datalist,
        {
            "roi_size": [32] * 3,
            "batch_size": 1,
            "ckpt_dir": str(root / "ckpt"),
            "output_dir": str(root / "out"),
            **overrides,
        },
    )


def test_step_budget_stops_exactly_and_checkpoints_do_not_count_as_training_time(data):
    calls = []

    def evaluate(parser, trainer):
        calls.append(trainer.state.iteration)
        time.sleep(0.4)  # an evaluation's time must not be charged to training
        return {"marker": float(trainer.state.iteration)}

    t0 = time.perf_counter()
    result = train_with_budget(
        _parser(data),
        model="example",
        seed=1,
        max_steps=5,
        checkpoint_steps=[2, 4],
        evaluate=evaluate,
        log_every=1,
        progress=None,
    )
    wall = time.perf_counter() - t0
    assert result["steps"] == 5 and result["stopped_by"] == "steps"
    assert calls == [2, 4, 5]  # the two marks, then the end of training
    assert [c["steps"] for c in result["checkpoints"]] == [2, 4, 5]
    assert [c["metrics"]["marker"] for c in result["checkpoints"]] == [2.0, 4.0, 5.0]
    assert result["train_seconds"] < wall - 3 * 0.4
    # ... and no training time is lost either: at least half of the steps took the median time or longer
    assert result["train_seconds"] >= 0.5 * result["steps"] * result["step_seconds_median"]
    seconds = [c["seconds"] for c in result["checkpoints"]]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(result["train_seconds"])
    assert len(result["loss_curve"]) == 5 and result["loss_curve"][-1][0] == 5
    assert result["budget"] == {"max_steps": 5, "max_seconds": None, "max_epochs": None}
    # the config's own handlers (validation, best-model saver, last.ckpt) were dropped: nothing written
    assert not os.path.exists(os.path.join(data[2], "ckpt", "model.pt"))
    assert not os.path.exists(os.path.join(data[2], "ckpt", "last.ckpt"))


def test_time_budget_stops_after_the_seconds_and_seed_fixes_the_initial_weights(data):
    result = train_with_budget(_parser(data), model="example", seed=0, max_seconds=1.0, progress=None)
    assert result["stopped_by"] == "seconds"
    assert 1.0 <= result["train_seconds"] < 1.0 + 10 * result["step_seconds_median"] + 2.0
    first = []

    def grab(parser, trainer):
        first.append(next(parser.get_parsed_content("network").parameters()).detach().clone())
        return {}

    for _ in range(2):
        train_with_budget(_parser(data), model="example", seed=7, max_steps=1, evaluate=grab, progress=None)
    assert (first[0] == first[1]).all()  # same seed, same training


def test_epoch_budget_and_missing_budget(data):
    with open(data[1]) as f:
        training_cases = len(json.load(f)["training"])
    result = train_with_budget(_parser(data), model="example", max_epochs=2, progress=None)
    assert result["stopped_by"] == "epochs" and result["epochs"] == 2 and result["steps"] == 2 * training_cases
    with pytest.raises(ValueError, match="max_steps, max_seconds or max_epochs"):
        train_with_budget(_parser(data), model="example")


def test_cached_run_trains_once(tmp_path):
    runs = []

    def run():
        runs.append(1)
        return {"steps": 3}

    path = str(tmp_path / "run.json")
    assert cached_run(path, run, say=None) == {"steps": 3}
    assert cached_run(path, run, say=None) == {"steps": 3}
    assert runs == [1]
    with open(path) as f:
        assert json.load(f) == {"steps": 3}
