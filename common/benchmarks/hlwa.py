"""HLWA-UNet against MONAI's SegResNet and SwinUNETR on the realistic synthetic phantom, under wall-clock budgets.

The protocol, fixed before any result was seen:

- **Data**: one synthetic BraTS 2021-layout dataset (``phantom="realistic"``, :mod:`common.data.synthetic.brain`),
  split once by :func:`~common.data.datalist.build_datalist`: ``training``, a small ``validation`` set (for the
  learning curve only) and ``testing`` (at least 12 held-out cases, for every reported Dice).
- **Training**: every model is trained by the HLWA bundle's own ``train#trainer`` (its datalist, transforms,
  crops, augmentation, batch size and data order, read from ``configs/train.json``), through
  :func:`~common.benchmarks.budget.train_with_budget`; only ``network_def``, ``loss`` and the optimiser class are
  overridden for the baselines (:data:`MODELS`). All models get the same learning rate, constant (a schedule
  that does not depend on the budget, so one run gives the results at every budget).
- **Models**: HLWA-UNet as the bundle ships it; SegResNet with the MONAI Model Zoo ``brats_mri_segmentation``
  settings (16 filters, blocks 1-2-2-4 / 1-1-1, dropout 0.2, Adam, weight decay 1e-5); SwinUNETR (MONAI) at the
  CPU-sized ``feature_size`` 12 (the BraTS tutorial uses 48), AdamW, weight decay 1e-5. Both baselines use the
  Model Zoo's Dice loss, ``DiceLoss(sigmoid, squared_pred, smooth_nr=0, smooth_dr=1e-5)``, the Dice part of
  HLWA-UNet's own loss.
- **Budgets**: one run per (model, seed) up to the largest budget; the held-out test set is evaluated at every
  budget (300, 600, 1200 s by default) and the validation set every ``curve_every_s`` seconds, with the training
  clock stopped while evaluating. Each budget is reported as seconds and as the optimiser steps reached.
- **Metrics**: Dice per region (TC, WT, ET; sigmoid > 0.5; sliding window at the crop size, overlap 0.5) per
  test case; per model mean +- sd over seeds; a paired per-case comparison HLWA-UNet - each baseline (each
  case's Dice averaged over seeds, Wilcoxon signed-rank test, scipy); median training-step time; sliding-window
  inference time on one 4 x 240 x 240 x 155 volume (ROI 128, overlap 0.5) and peak memory of that inference and
  of a training step at ROI 128, each in a fresh subprocess, interleaved over the models.

Runs are cached (:func:`~common.benchmarks.budget.cached_run`): a killed benchmark, restarted with the same
``work_dir`` and settings, trains only what is missing. ``jobs`` runs go in parallel processes of ``threads``
torch threads each. Every figure is measured in this run; nothing is copied from a paper.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from common.benchmarks.budget import cached_run, train_with_budget
from common.benchmarks.report import bundle_train_parser, model_names, write_report
from common.io import atomic_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLE = os.path.join(REPO, "bundles", "brats_mri_hlwa_segmentation")
REGIONS = ("TC", "WT", "ET")
NAMES = {"hlwa": "HLWA-UNet", "segresnet": "SegResNet (Model Zoo)", "swinunetr": "SwinUNETR (feature_size 12)"}
BASELINES = ("segresnet", "swinunetr")

#: the Model Zoo ``brats_mri_segmentation`` Dice loss, also the Dice part of HLWA-UNet's loss
MODEL_ZOO_DICE = {"_target_": "DiceLoss", "sigmoid": True, "squared_pred": True, "smooth_nr": 0.0, "smooth_dr": 1e-5}
#: MONAI Model Zoo brats_mri_segmentation: SegResNet(blocks_down 1,2,2,4; blocks_up 1,1,1; 16 filters; dropout 0.2)
SEGRESNET = {
    "_target_": "SegResNet",
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 3,
    "init_filters": 16,
    "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1],
    "dropout_prob": 0.2,
}
#: MONAI SwinUNETR as in its BraTS tutorial, but feature_size 12 instead of 48 (CPU-sized; must be a multiple of 12)
SWINUNETR = {"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": 4, "out_channels": 3, "feature_size": 12}
#: model name -> overrides of the HLWA bundle's train.json (everything else, data to trainer, is the bundle's)
MODELS: dict[str, dict[str, Any]] = {
    "hlwa": {},
    "segresnet": {"network_def": SEGRESNET, "loss": MODEL_ZOO_DICE, "optimizer#_target_": "torch.optim.Adam"},
    "swinunetr": {"network_def": SWINUNETR, "loss": MODEL_ZOO_DICE, "optimizer#_target_": "torch.optim.AdamW"},
    # variants of HLWA-UNet, trained only when asked for (``models=``)
    "hlwa_modality_dropout": {"modality_dropout_prob": 0.5},
    "hlwa_no_rcl": {"rcl_weight": 0.0},
    "hlwa_masked_rcl": {"rcl_mode": "masked"},
}
DEFAULT_MODELS = ("hlwa", "segresnet", "swinunetr")


class ProtocolError(ValueError):
    """The benchmark's settings break its protocol (too few seeds or test cases, another protocol's work folder)."""


def check_models(models) -> list[str]:
    """The model names to train, validated: known names, no repeats, ``hlwa`` and both baselines included."""
    names = model_names(models, MODELS)
    missing = [m for m in ("hlwa", *BASELINES) if m not in names]
    if missing:
        raise ValueError(f"the models must include {missing}: the report compares hlwa with {', '.join(BASELINES)}")
    return names


def model_parser(
    name: str,
    dataset_dir: str,
    datalist: str,
    roi: int,
    learning_rate: float,
    seed: int = 0,
    work_dir: str = "",
    device: str | None = None,
):
    """The HLWA bundle's training ``ConfigParser`` for model ``name``: data, ``roi``^3 crops, learning rate, the
    seed of the data order and the device (default the bundle's: CUDA when present); only the model's
    :data:`MODELS` overrides differ between models."""
    overrides = {
        "roi_size": [int(roi)] * 3,
        "learning_rate": float(learning_rate),
        "seed": int(seed),
        "ckpt_dir": os.path.join(work_dir, "unused_checkpoints"),
        "output_dir": os.path.join(work_dir, "unused_logs"),
        **MODELS[name],
    }
    if device is not None:
        overrides["device"] = f"$torch.device({str(device)!r})"
    return bundle_train_parser(BUNDLE, dataset_dir, datalist, overrides)


class HeldOutDice:
    """``evaluate`` for :func:`train_with_budget`: per-case Dice of the validation and/or test cases at each mark.

    ``marks`` are the sorted seconds given to ``train_with_budget`` as ``checkpoint_seconds``; the k-th call is
    the k-th mark (the budget trainer calls once per mark, in order), and a call after the last mark is the end
    of training. The test cases are evaluated at the marks in ``test_marks`` and at the end, the validation
    cases at every call; marks passed within one training step reuse that step's evaluations. Returns
    ``{"mark_s", "validation": {...}, "test": {...}}`` with ``dice`` (cases x TC/WT/ET), ``cases`` and ``dice_mean``.
    """

    def __init__(self, marks, test_marks, datalist: str, dataset_dir: str) -> None:
        self.marks = sorted(float(m) for m in marks)
        self.test_marks = {float(m) for m in test_marks}
        self.datalist, self.dataset_dir = datalist, dataset_dir
        self.calls = 0
        self.datasets: dict[str, Any] = {}
        self.last_step: int | None = None
        self.last: dict[str, dict[str, Any]] = {}

    def _dataset(self, parser, split: str):
        if split not in self.datasets:
            from monai.data import CacheDataset

            from common.data.decathlon import load_datalist

            items = load_datalist(self.datalist, split, self.dataset_dir)
            transform = parser.get_parsed_content("validate#preprocessing")
            self.datasets[split] = CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
        return self.datasets[split]

    def dice(self, parser, split: str) -> dict[str, Any]:
        from monai.metrics import DiceMetric

        net = parser.get_parsed_content("network")
        inferer = parser.get_parsed_content("validate#inferer")
        device = parser.get_parsed_content("device")
        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        net.eval()
        cases = []
        with torch.no_grad():
            for item in self._dataset(parser, split):
                logits = inferer(item["image"][None].to(device), net)
                metric((torch.sigmoid(logits.float()) > 0.5).float(), item["label"][None].to(device))
                cases.append(item.get("case", str(len(cases))))
        net.train()
        dice = metric.aggregate().cpu().numpy()
        return {"cases": cases, "dice": dice.tolist(), "dice_mean": float(dice.mean())}

    def __call__(self, parser, trainer) -> dict[str, Any]:
        mark = self.marks[self.calls] if self.calls < len(self.marks) else None
        self.calls += 1
        step = getattr(getattr(trainer, "state", None), "iteration", None)
        if step is None or step != self.last_step:  # marks passed within one step share its evaluations
            self.last_step, self.last = step, {}
        out: dict[str, Any] = {"mark_s": mark}
        wanted = [("validation", "validation", "val_dice_mean")]
        if mark is None or mark in self.test_marks:
            wanted.append(("testing", "test", "test_dice_mean"))
        for split, key, summary in wanted:
            if split not in self.last:
                self.last[split] = self.dice(parser, split)
            out[key], out[summary] = self.last[split], self.last[split]["dice_mean"]
        return out


def train_one(task: dict[str, Any]) -> dict[str, Any]:
    """One (model, seed) run up to ``max(budgets_s)`` seconds; see :class:`HeldOutDice`. Picklable for a pool."""
    torch.set_num_threads(int(task["threads"]))
    parser = model_parser(
        task["model"],
        task["dataset_dir"],
        task["datalist"],
        task["roi"],
        task["learning_rate"],
        task["seed"],
        task["work_dir"],
        task["device"],
    )
    budgets = [float(b) for b in task["budgets_s"]]
    curve = np.arange(task["curve_every_s"], max(budgets), task["curve_every_s"]).tolist()
    marks = sorted(set(curve) | set(budgets))
    evaluate = HeldOutDice(marks, budgets, task["datalist"], task["dataset_dir"])
    result = train_with_budget(
        parser,
        model=task["model"],
        seed=task["seed"],
        max_seconds=max(budgets),
        checkpoint_seconds=marks,
        evaluate=evaluate,
        progress=lambda msg: print(msg, flush=True),
    )
    result["parameters_m"] = sum(p.numel() for p in parser.get_parsed_content("network").parameters()) / 1e6
    result["learning_rate"] = task["learning_rate"]
    return result


def _run_cached(task: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(task["work_dir"], "runs", f"{task['model']}_seed{task['seed']}.json")
    return cached_run(path, lambda: train_one(task), say=lambda msg: print(msg, flush=True))


def _measure_child(model: str, mode: str, roi: int, shape: list[int], device: str, threads: int) -> dict[str, float]:
    """Run :func:`child_main` in a fresh interpreter; return its timing and peak memory."""
    cmd = [
        sys.executable,
        "-m",
        "common.benchmarks.hlwa",
        model,
        mode,
        str(roi),
        ",".join(map(str, shape)),
        device,
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {model} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(model: str, mode: str, roi: int, shape: str, device: str, threads: str = "1") -> None:
    """One measurement in a fresh process: ``infer`` (sliding window over a whole volume) or ``train`` (one step
    at ``roi``^3, batch 1). Prints one JSON line: seconds and peak memory (CPU: ``ru_maxrss``; CUDA:
    ``max_memory_allocated``)."""
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    roi = int(roi)
    dev = torch.device(device)
    parser = model_parser(model, "", "", roi, 1e-4, device=device)
    net = parser.get_parsed_content("network_def").to(dev)
    amp = dev.type == "cuda"
    size = [int(s) for s in shape.split(",")]
    if mode == "infer":
        from monai.inferers import SlidingWindowInferer

        net.eval()
        x = torch.randn(1, 4, *size, device=dev)
        inferer = SlidingWindowInferer(roi_size=[roi] * 3, sw_batch_size=1, overlap=0.5)
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            inferer(x[..., :roi, :roi, :roi], net)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            inferer(x, net)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    else:
        loss_fn = parser.get_parsed_content("loss")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        net.train()
        x = torch.randn(1, 4, roi, roi, roi, device=dev)
        y = (torch.rand(1, 3, roi, roi, roi, device=dev) > 0.9).float()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, enabled=amp):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb}))


def prepare_data(work_dir: str, num_cases: int, shape, seed: int, val_fraction: float, test_fraction: float):
    """Write the realistic-phantom dataset once (reused when complete) and its datalist; return both paths."""
    from common.data.datalist import build_datalist, save_datalist
    from common.data.synthetic.write import write_synthetic_dataset

    data_dir = os.path.join(work_dir, f"brats2021_realistic_{num_cases}x{'x'.join(map(str, shape))}_seed{seed}")
    if not os.path.isfile(os.path.join(data_dir, ".complete")):
        print(f"writing {num_cases} realistic synthetic BraTS 2021 cases of {list(shape)} to {data_dir}", flush=True)
        write_synthetic_dataset(
            "brats2021", data_dir, num_cases=num_cases, shape=list(shape), seed=seed, phantom="realistic"
        )
        with open(os.path.join(data_dir, ".complete"), "w") as f:
            f.write("complete\n")
    datalist = os.path.join(work_dir, "datalist.json")
    save_datalist(
        build_datalist(
            "brats2021", data_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, progress=False
        ),
        datalist,
    )
    return data_dir, datalist


def run_benchmark(
    work_dir: str = "runs/benchmark_hlwa",
    num_cases: int = 40,
    shape: tuple[int, ...] = (96, 96, 64),
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
    roi: int = 64,
    budgets_s: tuple[float, ...] = (300.0, 600.0, 1200.0),
    curve_every_s: float = 100.0,
    seeds: tuple[int, ...] = (0, 1, 2),
    learning_rate: float = 1e-3,
    models=DEFAULT_MODELS,
    jobs: int = 1,
    threads: int = 1,
    data_seed: int = 0,
    inference_shape: tuple[int, ...] = (240, 240, 155),
    inference_roi: int = 128,
    inference_repeats: int = 2,
    device: str = "cpu",
    pilot: bool = False,
) -> dict[str, Any]:
    """Run the protocol of the module docstring; write ``benchmark_hlwa.{json,md}`` and the learning curve PNG.

    The protocol needs at least 3 seeds and 12 test cases (:class:`ProtocolError` otherwise) unless ``pilot``:
    a pilot (e.g. one seed, 60 s budgets, a few cases) checks the pipeline end to end, and its report says
    ``"pilot": true``, which :func:`update_bundle_docs` refuses. Results of finished runs and measurements under
    ``work_dir`` are reused; the settings are stored in ``work_dir/protocol.json`` and a rerun with other
    settings in the same folder is refused.
    """
    names = check_models(models)
    seeds = [int(s) for s in seeds]
    budgets = sorted(float(b) for b in budgets_s)
    if len(seeds) < 3 and not pilot:
        raise ProtocolError(f"the protocol needs at least 3 seeds, got {seeds} (or set pilot)")
    work_dir = os.path.abspath(work_dir)
    protocol = {
        "num_cases": int(num_cases),
        "shape": list(shape),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "roi": int(roi),
        "budgets_s": budgets,
        "curve_every_s": float(curve_every_s),
        "learning_rate": float(learning_rate),
        "threads": int(threads),
        "data_seed": int(data_seed),
        "phantom": "realistic",
        "device": device,
        "seeds": seeds,
        "inference_shape": list(inference_shape),
        "inference_roi": int(inference_roi),
        "inference_repeats": int(inference_repeats),
        "pilot": bool(pilot),
    }
    _check_protocol(work_dir, protocol)
    dataset_dir, datalist = prepare_data(work_dir, num_cases, shape, data_seed, val_fraction, test_fraction)
    with open(datalist) as f:
        split = json.load(f)
    if len(split["testing"]) < 12 and not pilot:
        raise ProtocolError(f"the protocol needs at least 12 test cases, got {len(split['testing'])} (or set pilot)")
    tasks = [
        {"model": m, "seed": s, "dataset_dir": dataset_dir, "datalist": datalist, "work_dir": work_dir, **protocol}
        for s in seeds
        for m in names
    ]
    print(
        f"HLWA benchmark: {len(tasks)} runs ({', '.join(names)} x seeds {seeds}) of {max(budgets):.0f} s, "
        f"{jobs} at a time with {threads} thread(s) each; {len(split['training'])} training, "
        f"{len(split['validation'])} validation, {len(split['testing'])} test cases",
        flush=True,
    )
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(_run_cached, tasks))
    else:
        runs = [_run_cached(t) for t in tasks]
    measurements = _measurements(
        work_dir, names, inference_roi, list(inference_shape), device, threads, inference_repeats
    )
    report = summarise(runs, measurements, protocol, split)
    write_report(work_dir, "benchmark_hlwa", report, format_report(report))
    plot_learning_curve(report, os.path.join(work_dir, "benchmark_hlwa_learning_curve.png"))
    return report


def _check_protocol(work_dir: str, protocol: dict[str, Any]) -> None:
    path = os.path.join(work_dir, "protocol.json")
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored != protocol:
            changed = sorted(k for k in set(stored) | set(protocol) if stored.get(k) != protocol.get(k))
            raise ProtocolError(f"{work_dir} holds runs of another protocol (differs in {changed}); use a new work_dir")
        return
    os.makedirs(work_dir, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(protocol, f, indent=2)


def _measurements(work_dir, names, roi, shape, device, threads, repeats) -> dict[str, dict[str, Any]]:
    """Inference and training-step timing and memory per model, in fresh processes, interleaved, cached."""
    out: dict[str, dict[str, Any]] = {}
    models = [n for n in ("hlwa", *BASELINES) if n in names]
    for rep in range(repeats):
        for name in models:
            path = os.path.join(work_dir, "measurements", f"{name}_infer_{rep}.json")
            m = cached_run(path, lambda name=name: _measure_child(name, "infer", roi, shape, device, threads), say=None)
            out.setdefault(name, {}).setdefault("infer_s", []).append(m["seconds"])
            out[name]["infer_peak_gb"] = max(out[name].get("infer_peak_gb", 0.0), m["peak_gb"])
            print(
                f"[{name}] inference on 4x{'x'.join(map(str, shape))} (roi {roi}) run {rep + 1}: "
                f"{m['seconds']:.1f} s, peak {m['peak_gb']:.2f} GB",
                flush=True,
            )
    for name in models:
        path = os.path.join(work_dir, "measurements", f"{name}_train.json")
        m = cached_run(path, lambda name=name: _measure_child(name, "train", roi, shape, device, threads), say=None)
        out[name].update(train_step_roi_s=m["seconds"], train_peak_gb=m["peak_gb"])
        print(f"[{name}] one training step at roi {roi}: {m['seconds']:.1f} s, peak {m['peak_gb']:.2f} GB", flush=True)
    return out


def _mean_sd(values) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0}


def summarise(runs: list[dict], measurements: dict, protocol: dict, split: dict) -> dict[str, Any]:
    """The report: per model and budget Dice (mean +- sd over seeds) and steps, paired per-case comparisons,
    learning curves, speed and memory, and the targets.

    ``runs``: results of :func:`train_one`; ``measurements``: model -> ``infer_s`` (list), ``infer_peak_gb``,
    ``train_step_roi_s``, ``train_peak_gb``; ``split``: the datalist.
    """
    from scipy.stats import wilcoxon

    budgets = protocol["budgets_s"]
    models: dict[str, Any] = {}
    per_case: dict[str, dict[float, np.ndarray]] = {}
    for name in dict.fromkeys(r["model"] for r in runs):
        mine = sorted((r for r in runs if r["model"] == name), key=lambda r: r["seed"])
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in mine],
            "parameters_m": mine[0]["parameters_m"],
            "step_seconds_median": _mean_sd([r["step_seconds_median"] for r in mine]),
            "steps_per_second": _mean_sd([1.0 / r["step_seconds_median"] for r in mine]),
            "budgets": {},
            "curve": [[[c["seconds"], c["metrics"]["val_dice_mean"]] for c in r["checkpoints"]] for r in mine],
        }
        per_case[name] = {}
        for budget in budgets:
            points = [next(c for c in r["checkpoints"] if c["metrics"]["mark_s"] == budget) for r in mine]
            dice = np.array([c["metrics"]["test"]["dice"] for c in points])  # seeds x cases x regions
            per_case[name][budget] = dice.mean(axis=(0, 2))
            entry["budgets"][str(int(budget))] = {
                "seconds": _mean_sd([c["seconds"] for c in points]),
                "steps": _mean_sd([c["steps"] for c in points]),
                "dice_mean": _mean_sd(dice.mean(axis=(1, 2))),
                **{f"dice_{r}": _mean_sd(dice[:, :, i].mean(axis=1)) for i, r in enumerate(REGIONS)},
                "per_seed_dice_mean": dice.mean(axis=(1, 2)).tolist(),
            }
        entry.update(measurements.get(name, {}))
        models[name] = entry
    paired: dict[str, Any] = {}
    for baseline in BASELINES:
        paired[baseline] = {}
        for budget in budgets:
            diff = per_case["hlwa"][budget] - per_case[baseline][budget]
            paired[baseline][str(int(budget))] = {
                "mean_difference": float(diff.mean()),
                "sd_difference": float(diff.std(ddof=1)),
                "hlwa_better_cases": int((diff > 0).sum()),
                "cases": int(diff.size),
                "wilcoxon_p": float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0,
            }
    h = models["hlwa"]
    targets = {}
    for budget in budgets[1:]:
        key = str(int(budget))
        for baseline in BASELINES:
            theirs = models[baseline]["budgets"][key]["dice_mean"]["mean"]
            targets[f"Dice at {key} s >= {NAMES[baseline]}"] = h["budgets"][key]["dice_mean"]["mean"] >= theirs
    if "infer_s" in h and "infer_s" in models["segresnet"]:
        targets["inference <= 1.0x SegResNet"] = min(h["infer_s"]) <= min(models["segresnet"]["infer_s"])
    step = models["segresnet"]["step_seconds_median"]["mean"]
    targets["training step <= 1.3x SegResNet"] = h["step_seconds_median"]["mean"] <= 1.3 * step
    return {
        "protocol": protocol,
        "split": {k: len(split[k]) for k in ("training", "validation", "testing")},
        "models": models,
        "paired": paired,
        "targets": targets,
    }


def benchmark_command(protocol: dict[str, Any], jobs: int = 2) -> str:
    """The ``tools/benchmark_hlwa.py`` command line that runs ``protocol`` (every setting spelt out)."""
    p = protocol
    return (
        f"python tools/benchmark_hlwa.py --num_cases {p['num_cases']} --shape {','.join(map(str, p['shape']))} "
        f"--val_fraction {p['val_fraction']:g} --test_fraction {p['test_fraction']:g} --data_seed {p['data_seed']} "
        f"--roi {p['roi']} --budgets_s {','.join(f'{b:g}' for b in p['budgets_s'])} "
        f"--curve_every_s {p['curve_every_s']:g} --seeds {','.join(map(str, p['seeds']))} "
        f"--learning_rate {p['learning_rate']:g} --inference_shape {','.join(map(str, p['inference_shape']))} "
        f"--inference_roi {p['inference_roi']} --inference_repeats {p['inference_repeats']} --device {p['device']} "
        f"--jobs {jobs} --threads {p['threads']}" + (" --pilot true" if p.get("pilot") else "")
    )


def format_report(report: dict[str, Any]) -> str:
    """Markdown: the protocol, Dice and steps per model and budget, the paired comparison, speed, targets."""
    p, models = report["protocol"], report["models"]
    budgets = [str(int(b)) for b in p["budgets_s"]]
    split = report["split"]
    fmt = "{mean:.3f} +- {sd:.3f}".format_map
    lines = ["**PILOT run, not the protocol (too few seeds or test cases).**", ""] if p.get("pilot") else []
    lines += [
        f'Synthetic data (realistic phantom, `phantom="realistic"`): {split["training"]} training, '
        f"{split['validation']} validation (learning curve only) and {split['testing']} held-out test cases of "
        f"{'x'.join(map(str, p['shape']))} voxels; crops {p['roi']}^3, batch 2, the HLWA bundle's transforms and "
        f"trainer for every model, constant learning rate {p['learning_rate']:g}; seeds {p['seeds']}; "
        f"{p['threads']} torch thread(s) per run; device {p['device']}. Held-out test Dice, mean +- sd over seeds.",
        "",
        "| model | params (M) | budget (s) | steps | Dice mean | TC | WT | ET |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in models.items():
        for b in budgets:
            e = m["budgets"][b]
            lines.append(
                f"| {NAMES.get(name, name)} | {m['parameters_m']:.2f} | {b} | {e['steps']['mean']:.0f} +- "
                f"{e['steps']['sd']:.0f} | {fmt(e['dice_mean'])} | {fmt(e['dice_TC'])} | {fmt(e['dice_WT'])} | "
                f"{fmt(e['dice_ET'])} |"
            )
    lines += [
        "",
        "Paired per-case comparison: each test case's Dice (mean over regions and seeds), HLWA-UNet minus the "
        "baseline, Wilcoxon signed-rank test:",
        "",
        "| baseline | budget (s) | mean difference | sd | cases where HLWA-UNet is better | p |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for baseline, rows in report["paired"].items():
        for b in budgets:
            r = rows[b]
            lines.append(
                f"| {NAMES[baseline]} | {b} | {r['mean_difference']:+.3f} | {r['sd_difference']:.3f} | "
                f"{r['hlwa_better_cases']}/{r['cases']} | {r['wilcoxon_p']:.3g} |"
            )
    names = list(models)
    rows = [("training step, median (s)", lambda m: f"{m['step_seconds_median']['mean']:.2f}")]
    rows.append(("steps per second", lambda m: f"{m['steps_per_second']['mean']:.2f}"))
    if all("infer_s" in models[n] for n in names):
        shape = "x".join(map(str, p["inference_shape"]))
        rows += [
            (
                f"inference 4x{shape}, roi {p['inference_roi']} (s, best of {p['inference_repeats']})",
                lambda m: f"{min(m['infer_s']):.1f}",
            ),
            ("peak memory, that inference (GB)", lambda m: f"{m['infer_peak_gb']:.2f}"),
            (f"one training step at roi {p['inference_roi']} (s)", lambda m: f"{m['train_step_roi_s']:.1f}"),
            ("peak memory, that training step (GB)", lambda m: f"{m['train_peak_gb']:.2f}"),
        ]
    lines += ["", "| | " + " | ".join(NAMES.get(n, n) for n in names) + " |", "| --- |" + " ---: |" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(models[n]) for n in names) + " |" for label, cell in rows]
    lines.append("")
    lines += [f"- {target}: {'met' if ok else 'NOT met'}" for target, ok in report["targets"].items()]
    return "\n".join(lines)


def plot_learning_curve(report: dict[str, Any], png: str) -> str:
    """Validation Dice against training seconds, one line per model (mean over seeds) with a min-max seed band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, m in report["models"].items():
        grid = sorted({round(s) for curve in m["curve"] for s, _ in curve})
        values = np.array([np.interp(grid, [s for s, _ in c], [v for _, v in c]) for c in m["curve"]])
        (line,) = ax.plot(grid, values.mean(axis=0), marker=".", label=NAMES.get(name, name))
        ax.fill_between(grid, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    for budget in report["protocol"]["budgets_s"]:
        ax.axvline(budget, color="grey", lw=0.5, ls=":")
    ax.set_xlabel(f"training time (s, {report['protocol']['threads']} torch thread(s) per run)")
    ax.set_ylabel("validation Dice (mean of TC, WT, ET)")
    ax.set_ylim(0, 1)
    seeds = len(next(iter(report["models"].values()))["seeds"])
    ax.set_title(f"Synthetic data (realistic phantom): mean and range over {seeds} seeds", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png


CARD_START, CARD_END = "<!-- benchmark-report:start -->", "<!-- benchmark-report:end -->"
CURVE_FILE = "benchmark_learning_curve.png"


def update_bundle_docs(report: dict[str, Any], bundle_dir: str = BUNDLE) -> tuple[str, str, str]:
    """Write the benchmark into the bundle: the model card's section between :data:`CARD_START` and
    :data:`CARD_END` (command, tables, learning curve, targets), ``docs/`` + :data:`CURVE_FILE`, and
    ``eval_metrics`` in ``configs/metadata.json`` (HLWA-UNet at the largest budget, labelled synthetic).

    Returns the paths of the card, the PNG and the metadata. Raises ``ValueError`` for a pilot report or a card
    without the markers.
    """
    card = os.path.join(bundle_dir, "docs", "README.md")
    with open(card) as f:
        text = f.read()
    if report["protocol"].get("pilot"):
        raise ValueError("a pilot report (fewer seeds or test cases than the protocol) does not go into the card")
    if text.count(CARD_START) != 1 or text.count(CARD_END) != 1:
        raise ValueError(f"{card} needs exactly one {CARD_START} and one {CARD_END} line")
    png = plot_learning_curve(report, os.path.join(bundle_dir, "docs", CURVE_FILE))
    p = report["protocol"]
    section = "\n".join(
        [
            CARD_START,
            "",
            "Written by `tools/benchmark_hlwa.py --update_bundle true` from the run's report; do not edit by hand.",
            "",
            "```bash",
            benchmark_command(p),
            "```",
            "",
            format_report(report),
            "",
            f"![validation Dice against training time]({CURVE_FILE})",
            "",
            CARD_END,
        ]
    )
    head, rest = text.split(CARD_START)
    _, tail = rest.split(CARD_END)
    with atomic_path(card) as tmp, open(tmp, "w") as f:
        f.write(head + section + tail)
    metadata = os.path.join(bundle_dir, "configs", "metadata.json")
    with open(metadata) as f:
        meta = json.load(f)
    budget = str(int(max(p["budgets_s"])))
    h = report["models"]["hlwa"]["budgets"][budget]
    meta["eval_metrics"] = {
        **{f"synthetic_test_dice_{r}": round(h[f"dice_{r}"]["mean"], 4) for r in REGIONS},
        "synthetic_test_mean_dice": round(h["dice_mean"]["mean"], 4),
        "synthetic_test_mean_dice_sd_over_seeds": round(h["dice_mean"]["sd"], 4),
        "note": (
            f"SYNTHETIC data only, not a BraTS result: tools/benchmark_hlwa.py, realistic phantom, "
            f"{report['split']['testing']} held-out cases of {'x'.join(map(str, p['shape']))}, crops {p['roi']}^3, "
            f"{budget} s of training per run ({h['steps']['mean']:.0f} steps, {p['threads']} thread(s), "
            f"{p['device']}), lr {p['learning_rate']:g}, mean of seeds {p['seeds']}"
        ),
    }
    with atomic_path(metadata) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=4)
        f.write("\n")
    return card, png, metadata


if __name__ == "__main__":
    child_main(*sys.argv[1:])
