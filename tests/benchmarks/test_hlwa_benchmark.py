"""Tests of the HLWA benchmark (common/benchmarks/hlwa.py, tools/benchmark_hlwa.py): every model sees the same data,
crops and augmentation; the statistics, targets, card and metadata come from the runs. The benchmark itself trains
for hours and is run through tools/benchmark_hlwa.py, not here."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon

from common.benchmarks.budget import train_with_budget
from common.benchmarks.hlwa import (
    BUNDLE,
    CARD_END,
    CARD_START,
    DEFAULT_MODELS,
    MODELS,
    HeldOutDice,
    ProtocolError,
    benchmark_command,
    check_models,
    format_report,
    model_parser,
    plot_learning_curve,
    run_benchmark,
    summarise,
    update_bundle_docs,
)
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "benchmark_hlwa.py")


def test_default_models_are_hlwa_and_both_baselines():
    assert check_models(DEFAULT_MODELS) == ["hlwa", "segresnet", "swinunetr"]
    assert check_models("segresnet, hlwa,swinunetr,hlwa_no_rcl") == ["segresnet", "hlwa", "swinunetr", "hlwa_no_rcl"]
    assert check_models(("hlwa", "segresnet", "swinunetr")) == ["hlwa", "segresnet", "swinunetr"]  # fire's tuple


@pytest.mark.parametrize(
    "models, message",
    [
        ("hlwa,unet,segresnet,swinunetr", "unknown model"),
        ("hlwa,segresnet,swinunetr,hlwa", "listed twice"),
        ("hlwa,segresnet", "must include ['swinunetr']"),
    ],
)
def test_bad_model_lists_are_refused(models, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_models(models)


def test_models_override_only_network_loss_and_optimiser_and_variants_reach_the_loss():
    parsers = {name: model_parser(name, "", "", 64, 1e-3) for name in MODELS}
    nets = {name: type(p.get_parsed_content("network_def")).__name__ for name, p in parsers.items()}
    assert (nets["hlwa"], nets["segresnet"], nets["swinunetr"]) == ("HLWAUNet", "SegResNet", "SwinUNETR")
    assert parsers["swinunetr"].get_parsed_content("network_def").swinViT.patch_embed.embed_dim == 12
    for name in ("segresnet", "swinunetr"):
        dice = parsers[name].get_parsed_content("loss")
        assert (type(dice).__name__, dice.squared_pred, dice.smooth_nr, dice.smooth_dr) == ("DiceLoss", True, 0, 1e-5)
    optimisers = {n: parsers[n].get_parsed_content("optimizer") for n in ("hlwa", "segresnet", "swinunetr")}
    assert [type(o).__name__ for o in optimisers.values()] == ["AdamW", "Adam", "AdamW"]
    assert {o.param_groups[0]["lr"] for o in optimisers.values()} == {1e-3}
    assert {o.param_groups[0]["weight_decay"] for o in optimisers.values()} == {1e-5}
    # a misspelt override key would be accepted silently and train plain HLWA-UNet
    loss = {n: parsers[n].get_parsed_content("loss") for n in ("hlwa", "hlwa_no_rcl", "hlwa_masked_rcl")}
    assert (loss["hlwa"].rcl_weight, loss["hlwa"].rcl.mode) == (0.1, "global")
    assert (loss["hlwa_no_rcl"].rcl_weight, loss["hlwa_masked_rcl"].rcl.mode) == (0.0, "masked")
    assert parsers["hlwa_modality_dropout"].get_parsed_content("modality_dropout_prob") == 0.5


TINY = {
    "hlwa": {"network_def#features": [4, 8, 8, 16, 16], "network_def#num_heads": 2},
    "segresnet": {"network_def#init_filters": 8, "network_def#blocks_down": [1, 1, 1, 1]},
    "swinunetr": {"network_def#depths": [1, 1, 1, 1]},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 cases at 2 mm (4 for training): the foreground box is larger than the 64^3 crop, so crops are random."""
    root = tmp_path_factory.mktemp("hlwa_bench")
    write_synthetic_dataset("brats2021", str(root / "data"), num_cases=6, shape=[120, 120, 80], seed=0, progress=False)
    datalist = str(root / "datalist.json")
    split = build_datalist("brats2021", str(root / "data"), seed=0, val_fraction=1 / 6, test_fraction=1 / 6)
    save_datalist(split, datalist)
    return str(root / "data"), datalist, str(root)


def test_every_model_is_trained_on_the_same_cases_crops_and_augmentation(data):
    dataset_dir, datalist, root = data
    seen: dict[str, list] = {}
    chains = {}
    for name in DEFAULT_MODELS:
        parser = model_parser(name, dataset_dir, datalist, 64, 1e-3, seed=5, work_dir=root, device="cpu")
        parser.update(TINY[name])  # small widths keep the test fast; data, crops and trainer are the benchmark's
        chains[name] = [
            json.dumps(parser.get(key), sort_keys=True, default=str)
            for key in ("load_transforms", "train#random_transforms", "train#dataloader", "roi_size")
        ] + [parser.get_parsed_content("train#datalist")]
        batches = []

        def grab(parser, trainer, batches=batches):
            batch = trainer.state.batch  # decollated by MONAI: one dict per sample
            batches.append(tuple(torch.stack([item[k].as_tensor() for item in batch]) for k in ("image", "label")))
            return {}

        # 4 training cases, batch 2: steps 1-2 are the first epoch, step 3 starts the second (a new shuffle)
        train_with_budget(
            parser, model=name, seed=5, max_steps=3, checkpoint_steps=[1, 2, 3], evaluate=grab, progress=None
        )
        seen[name] = batches
    for name in DEFAULT_MODELS[1:]:
        assert chains[name] == chains["hlwa"], name  # identical datalist, transform chain, loader and crop size
        assert len(seen[name]) == len(seen["hlwa"]) == 3
        for (image, label), (ref_image, ref_label) in zip(seen[name], seen["hlwa"]):
            assert image.shape == ref_image.shape == (2, 4, 64, 64, 64)
            assert torch.equal(image, ref_image) and torch.equal(label, ref_label), name
    # the crops are really random (a fixed crop would make the comparison above vacuous) and the seed decides them
    assert not torch.equal(seen["hlwa"][0][0], seen["hlwa"][2][0])
    other = model_parser("segresnet", dataset_dir, datalist, 64, 1e-3, seed=6, work_dir=root, device="cpu")
    other.update(TINY["segresnet"])
    first = []
    train_with_budget(
        other, model="segresnet", seed=6, max_steps=1, evaluate=lambda p, t: first.append(t.state.batch) or {}
    )
    assert not torch.equal(torch.stack([item["image"].as_tensor() for item in first[0]]), seen["hlwa"][0][0])


class _Marks(HeldOutDice):
    """HeldOutDice whose Dice records the split and the evaluation's number: shows what each call evaluates."""

    def dice(self, parser, split):
        self.evaluations = getattr(self, "evaluations", 0) + 1
        return {"dice_mean": float(self.evaluations), "split": split}


def _at_step(iteration):
    return SimpleNamespace(state=SimpleNamespace(iteration=iteration))


def test_held_out_dice_evaluates_the_test_set_at_the_budgets_and_the_end_only():
    evaluate = _Marks([100, 300, 200, 600], test_marks=[300, 600], datalist="", dataset_dir="")
    # marks 200 and 300 both pass within step 7: one validation, reused; step 9 ends training after mark 600
    calls = [evaluate(None, _at_step(n)) for n in (5, 7, 7, 8, 9)]
    assert [c["mark_s"] for c in calls] == [100, 200, 300, 600, None]
    assert ["test" in c for c in calls] == [False, False, True, True, True]
    assert all(c["validation"]["split"] == "validation" for c in calls) and calls[2]["test"]["split"] == "testing"
    assert [c["val_dice_mean"] for c in calls] == [1, 2, 2, 4, 6]  # evaluations: 1, 2, (2), 3 test, 4, 5 test, 6
    assert [c.get("test_dice_mean") for c in calls] == [None, None, 3, 5, 7]


def _fake_runs(budgets, dice_of, seeds=(0, 1, 2), cases=12):
    """Runs as train_one returns them; ``dice_of(model, seed, budget)`` -> (cases, 3) Dice."""
    runs = []
    for model in DEFAULT_MODELS:
        for seed in seeds:
            checkpoints = [
                {"steps": int(b), "seconds": b + 0.5, "metrics": {"mark_s": b, "val_dice_mean": b / 2000}}
                for b in (100.0, 200.0)
            ]
            for b in budgets:
                d = dice_of(model, seed, b)
                checkpoints.append(
                    {
                        "steps": int(b) // (2 if model == "hlwa" else 3),
                        "seconds": b + 0.1,
                        "metrics": {
                            "mark_s": b,
                            "val_dice_mean": b / 2000,
                            "test": {"dice": d.tolist(), "cases": [str(i) for i in range(cases)]},
                        },
                    }
                )
            checkpoints.sort(key=lambda c: c["metrics"]["mark_s"])
            runs.append(
                {
                    "model": model,
                    "seed": seed,
                    "parameters_m": {"hlwa": 8.6, "segresnet": 4.7, "swinunetr": 1.5}[model],
                    "step_seconds_median": {"hlwa": 1.0, "segresnet": 0.9, "swinunetr": 0.5}[model],
                    "checkpoints": checkpoints,
                }
            )
    return runs


def _protocol(**changes):
    protocol = {
        "num_cases": 40, "shape": [96, 96, 64], "val_fraction": 0.1, "test_fraction": 0.3, "roi": 64,
        "budgets_s": [300.0, 600.0, 1200.0], "curve_every_s": 100.0, "learning_rate": 1e-3, "threads": 1,
        "data_seed": 0, "phantom": "realistic", "device": "cpu", "seeds": [0, 1, 2], "inference_shape": [240, 240, 155],
        "inference_roi": 128, "inference_repeats": 2, "pilot": False,
    }  # fmt: skip
    return {**protocol, **changes}


def test_summary_statistics_paired_comparison_and_targets(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, size=(12, 3))
    gap = {"hlwa": 0.05, "segresnet": 0.0, "swinunetr": 0.08}  # HLWA beats SegResNet, loses to SwinUNETR

    def dice_of(model, seed, budget):
        return np.clip(base + gap[model] + 0.01 * seed + rng.normal(0, 0.02, size=base.shape), 0, 1)

    runs = _fake_runs([300.0, 600.0, 1200.0], dice_of)
    measurements = {
        "hlwa": {"infer_s": [30.0, 29.0], "infer_peak_gb": 2.0, "train_step_roi_s": 8.0, "train_peak_gb": 3.0},
        "segresnet": {"infer_s": [31.0, 32.0], "infer_peak_gb": 2.0, "train_step_roi_s": 7.0, "train_peak_gb": 3.0},
        "swinunetr": {"infer_s": [20.0, 21.0], "infer_peak_gb": 1.0, "train_step_roi_s": 5.0, "train_peak_gb": 2.0},
    }
    split = {"training": [0] * 24, "validation": [0] * 4, "testing": [0] * 12}
    report = summarise(runs, measurements, _protocol(), split)
    h600 = report["models"]["hlwa"]["budgets"]["600"]
    per_seed = [np.mean(c["metrics"]["test"]["dice"]) for r in runs if r["model"] == "hlwa" for c in r["checkpoints"]
                if c["metrics"]["mark_s"] == 600.0]  # fmt: skip
    assert h600["dice_mean"]["mean"] == pytest.approx(np.mean(per_seed))
    assert h600["dice_mean"]["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert h600["steps"]["mean"] == 300 and report["models"]["segresnet"]["budgets"]["600"]["steps"]["mean"] == 200

    # paired: per case, mean over seeds and regions, HLWA minus baseline; Wilcoxon from scipy
    def case_means(model):
        return np.mean([np.mean(c["metrics"]["test"]["dice"], axis=1) for r in runs if r["model"] == model
                        for c in r["checkpoints"] if c["metrics"]["mark_s"] == 1200.0], axis=0)  # fmt: skip

    diff = case_means("hlwa") - case_means("segresnet")
    paired = report["paired"]["segresnet"]["1200"]
    assert paired["mean_difference"] == pytest.approx(diff.mean()) and paired["cases"] == 12
    assert paired["wilcoxon_p"] == pytest.approx(wilcoxon(diff).pvalue) and paired["hlwa_better_cases"] == 12
    assert report["paired"]["swinunetr"]["1200"]["mean_difference"] < 0
    targets = report["targets"]
    assert targets["Dice at 600 s >= SegResNet (Model Zoo)"] and targets["Dice at 1200 s >= SegResNet (Model Zoo)"]
    assert not targets["Dice at 600 s >= SwinUNETR (feature_size 12)"]
    assert targets["inference <= 1.0x SegResNet"] and targets["training step <= 1.3x SegResNet"]
    text = format_report(report)
    assert "NOT met" in text and f"{h600['dice_mean']['mean']:.3f} +- {h600['dice_mean']['sd']:.3f}" in text
    assert "PILOT" not in text
    png = plot_learning_curve(report, str(tmp_path / "curve.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the card and metadata are written from the report, and only from a protocol run
    bundle = tmp_path / "bundle"
    shutil.copytree(os.path.join(BUNDLE, "configs"), bundle / "configs")
    shutil.copytree(os.path.join(BUNDLE, "docs"), bundle / "docs")
    card, curve, metadata = update_bundle_docs(report, str(bundle))
    written = open(card).read()
    assert written.count(CARD_START) == written.count(CARD_END) == 1 and text in written
    # the card's command is the one that reproduces the protocol: the tool's parameters, the protocol's values
    command = benchmark_command(report["protocol"])
    assert command in written
    args = dict(zip(command.split()[2::2], command.split()[3::2]))
    spec = importlib.util.spec_from_file_location("benchmark_hlwa_tool", TOOL)
    tool_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool_module)
    tool = inspect.signature(tool_module.main).parameters
    assert {a[2:] for a in args} <= set(tool) and args["--learning_rate"] == "0.001" and args["--seeds"] == "0,1,2"
    assert {k for k in report["protocol"] if k not in ("phantom", "pilot")} <= {a[2:] for a in args}
    assert os.path.isfile(curve) and os.path.dirname(curve) == str(bundle / "docs")
    meta = json.load(open(metadata))
    h1200 = report["models"]["hlwa"]["budgets"]["1200"]
    assert meta["eval_metrics"]["synthetic_test_mean_dice"] == round(h1200["dice_mean"]["mean"], 4)
    assert "SYNTHETIC" in meta["eval_metrics"]["note"] and "12 held-out" in meta["eval_metrics"]["note"]
    assert update_bundle_docs(report, str(bundle))[0] == card and open(card).read() == written  # idempotent
    pilot = {**report, "protocol": _protocol(pilot=True)}
    assert format_report(pilot).startswith("**PILOT")
    with pytest.raises(ValueError, match="pilot"):
        update_bundle_docs(pilot, str(bundle))


def test_protocol_is_enforced_before_anything_is_written(tmp_path):
    with pytest.raises(ProtocolError, match="3 seeds"):
        run_benchmark(work_dir=str(tmp_path / "a"), seeds=(0, 1))
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "protocol.json").write_text(json.dumps({"learning_rate": 1e-4}))
    with pytest.raises(ProtocolError, match="another protocol"):
        run_benchmark(work_dir=str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["protocol.json"]


def test_cli_refuses_a_bad_model_list_or_seed_count_in_one_line_before_writing_data(tmp_path):
    work = tmp_path / "bench"
    for args, message in ((["--models", "hlwa,segresnet"], "swinunetr"), (["--seeds", "0"], "3 seeds")):
        out = subprocess.run(
            [sys.executable, TOOL, "--work_dir", str(work), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr
        assert not work.exists()
