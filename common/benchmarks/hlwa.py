"""HLWA-UNet against MONAI's SegResNet (Model Zoo ``brats_mri_segmentation`` settings), side by side.

Both networks are trained on the same synthetic BraTS-layout data, with the same crops and the same wall-clock
budget, through the HLWA bundle's own transforms (read from its ``configs/train.json``), then compared on
held-out cases: Dice per region (TC, WT, ET), training step time, sliding-window inference time on one
4 x 240 x 240 x 155 volume (ROI 128^3, overlap 0.5) and peak memory of a training step and of that inference
(each measured in a fresh subprocess, so one model's peak does not hide the other's).

Every figure is measured in this run; nothing is copied from a paper.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from common.benchmarks.report import bundle_train_parser, write_report

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "brats_mri_hlwa_segmentation",
)
REGIONS = ("TC", "WT", "ET")
MODALITIES = ("T1c", "T1", "T2", "FLAIR")
# model name -> (network family, overrides of the bundle's train.json)
MODELS = {
    "hlwa": ("hlwa", {}),
    "hlwa_modality_dropout": ("hlwa", {"modality_dropout_prob": 0.5}),
    "segresnet": ("segresnet", {}),
    # ablations of the contrastive term, trained only when asked for (``models=``)
    "hlwa_no_rcl": ("hlwa", {"rcl_weight": 0.0}),
    "hlwa_masked_rcl": ("hlwa", {"rcl_mode": "masked"}),
}
#: the models trained by default; ``hlwa`` and ``segresnet`` are always needed (the side-by-side table)
DEFAULT_MODELS = ("hlwa", "hlwa_modality_dropout", "segresnet")


def check_models(models) -> list[str]:
    """The model names to train, validated: known names, no repeats, ``hlwa`` and ``segresnet`` included."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if str(m).strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: choose from {sorted(MODELS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a model is listed twice: {names}")
    missing = [m for m in ("hlwa", "segresnet") if m not in names]
    if missing:
        raise ValueError(f"the models must include {missing}: the report compares hlwa with segresnet")
    return names


# MONAI Model Zoo brats_mri_segmentation: SegResNet(blocks_down 1,2,2,4; blocks_up 1,1,1; 16 filters; dropout 0.2),
# Adam lr 1e-4, weight decay 1e-5, DiceLoss(sigmoid, squared_pred, smooth_nr 0, smooth_dr 1e-5).
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


def _parser(dataset_dir: str, datalist: str, roi: list[int], overrides: dict[str, Any] | None = None):
    return bundle_train_parser(BUNDLE, dataset_dir, datalist, {"roi_size": roi, **(overrides or {})})


def build_model(name: str, parser) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, float]:
    """(network, loss, optimizer, learning rate) for ``"hlwa"`` (the bundle's configs) or ``"segresnet"``."""
    from monai.bundle import ConfigParser
    from monai.losses import DiceLoss

    if name == "hlwa":
        net = parser.get_parsed_content("network_def")
        loss = parser.get_parsed_content("loss")
        lr = float(parser.get_parsed_content("learning_rate"))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=float(parser.get_parsed_content("weight_decay")))
    elif name == "segresnet":
        seg = ConfigParser({"net": SEGRESNET})
        net = seg.get_parsed_content("net")
        loss = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)
        lr = float(parser.get_parsed_content("learning_rate"))
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    else:
        raise ValueError(f"unknown model {name!r}: use 'hlwa' or 'segresnet'")
    return net, loss, opt, lr


def train_for(net, loss_fn, opt, loader, budget_s: float, device: torch.device, amp: bool) -> dict[str, float]:
    """Train until ``budget_s`` seconds have passed (finishing the step in progress); return step statistics."""
    net.to(device).train()
    scaler = torch.amp.GradScaler(enabled=amp)
    times, losses, start = [], [], time.perf_counter()
    while time.perf_counter() - start < budget_s:
        for batch in loader:
            t0 = time.perf_counter()
            x, y = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
            if time.perf_counter() - start >= budget_s:
                break
    return {
        "steps": len(times),
        "step_s_median": float(np.median(times)),
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-5:])),
    }


@torch.no_grad()
def evaluate(net, loader, roi: list[int], device: torch.device, amp: bool, drop: int | None = None) -> dict[str, float]:
    """Per-region Dice (sigmoid > 0.5) over held-out cases with sliding-window inference.

    ``drop``: index of a modality (T1c, T1, T2, FLAIR) zeroed after normalisation, as ``DropChannelsd`` does.
    """
    from monai.inferers import SlidingWindowInferer
    from monai.metrics import DiceMetric

    net.to(device).eval()
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=0.5)
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    for batch in loader:
        image = batch["image"].to(device)
        if drop is not None:
            image = image.clone()
            image[:, drop] = 0
        with torch.autocast(device.type, enabled=amp):
            logits = inferer(image, net)
        metric((torch.sigmoid(logits.float()) > 0.5).float(), batch["label"].to(device))
    dice = metric.aggregate().cpu().numpy()
    out = {f"dice_{r}": float(v) for r, v in zip(REGIONS, dice)}
    out["dice_mean"] = float(dice.mean())
    return out


def _measure_child(model: str, mode: str, roi: int, shape: list[int], device: str) -> dict[str, float]:
    """Run :func:`child_main` in a fresh interpreter; return its timing and peak memory."""
    cmd = [sys.executable, "-m", "common.benchmarks.hlwa", model, mode, str(roi), ",".join(map(str, shape)), device]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(BUNDLE)))
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {model} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(model: str, mode: str, roi: int, shape: str, device: str) -> None:
    """One measurement in a fresh process: ``infer`` (sliding window over a whole volume) or ``train`` (one step).

    Prints one JSON line: seconds and peak resident memory (CPU: ``ru_maxrss``; CUDA: ``max_memory_allocated``).
    """
    torch.manual_seed(0)
    roi = int(roi)
    dev = torch.device(device)
    parser = _parser("", "", [roi] * 3)
    net, loss_fn, opt, _ = build_model(model, parser)
    net.to(dev)
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


def run_benchmark(
    work_dir: str = "runs/benchmark_hlwa",
    num_cases: int = 16,
    shape: tuple[int, ...] = (96, 96, 64),
    roi: int = 64,
    budget_s: float = 300.0,
    learning_rate: float | None = None,
    inference_shape: tuple[int, ...] = (240, 240, 155),
    inference_roi: int = 128,
    memory_roi: int = 128,
    inference_repeats: int = 2,
    device: str = "auto",
    seed: int = 0,
    models=DEFAULT_MODELS,
) -> dict[str, Any]:
    """Train each model for ``budget_s`` seconds on the same data and crops; compare on held-out cases.

    Models (``models``, names of :data:`MODELS`; default :data:`DEFAULT_MODELS`): HLWA-UNet as configured in the
    bundle, the same with random modality dropout (p = 0.5), and SegResNet with the Model Zoo settings; optionally
    the RCL ablations ``hlwa_no_rcl`` (weight 0) and ``hlwa_masked_rcl`` (mask-pooled form). ``learning_rate``
    (default: the bundle's 1e-4, as in the Model Zoo) applies to all. The HLWA models are also evaluated with each
    single modality missing.
    """
    from monai.data import DataLoader

    from common.data.datalist import build_datalist, save_datalist
    from common.data.synthetic.write import write_synthetic_dataset

    names = check_models(models)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    amp = dev.type == "cuda"
    work_dir = os.path.abspath(work_dir)
    data_dir = os.path.join(work_dir, f"brats2021_{num_cases}x{'x'.join(map(str, shape))}_seed{seed}")
    if not os.path.isfile(os.path.join(data_dir, ".complete")):
        print(f"writing {num_cases} synthetic BraTS 2021 cases of {shape} to {data_dir}", flush=True)
        write_synthetic_dataset("brats2021", data_dir, num_cases=num_cases, shape=list(shape), seed=seed)
        open(os.path.join(data_dir, ".complete"), "w").close()
    datalist = os.path.join(work_dir, "datalist.json")
    save_datalist(
        build_datalist("brats2021", data_dir, seed=seed, val_fraction=0.0, test_fraction=0.25, progress=False), datalist
    )
    overrides = {} if learning_rate is None else {"learning_rate": learning_rate}
    results: dict[str, Any] = {
        "device": str(dev),
        "num_cases": num_cases,
        "shape": list(shape),
        "roi": roi,
        "budget_s": budget_s,
        "inference_shape": list(inference_shape),
        "inference_roi": inference_roi,
        "torch_threads": torch.get_num_threads(),
        "models": {},
    }
    for name in names:
        family, model_overrides = MODELS[name]
        torch.manual_seed(seed)
        parser = _parser(data_dir, datalist, [roi] * 3, {**overrides, **model_overrides})
        net, loss_fn, opt, lr = build_model(family, parser)
        train_loader = DataLoader(parser.get_parsed_content("train#dataset"), batch_size=2, shuffle=True)
        parser["validate#datalist"] = "$load_datalist(@data_list_file_path, 'testing', @dataset_dir)"
        test_loader = DataLoader(parser.get_parsed_content("validate#dataset"), batch_size=1)
        params = sum(p.numel() for p in net.parameters())
        print(
            f"[{name}] {params / 1e6:.2f} M parameters, lr {lr:g}, training for {budget_s:.0f} s on {dev} ...",
            flush=True,
        )
        stats = train_for(net, loss_fn, opt, train_loader, budget_s, dev, amp)
        stats.update(evaluate(net, test_loader, [roi] * 3, dev, amp))
        stats.update(params_m=params / 1e6, learning_rate=lr, test_cases=len(test_loader.dataset))
        if family == "hlwa":
            stats["missing_modality"] = {
                m: evaluate(net, test_loader, [roi] * 3, dev, amp, drop=i)["dice_mean"]
                for i, m in enumerate(MODALITIES)
            }
        results["models"][name] = stats
        print(
            f"[{name}] {stats['steps']} steps, median step {stats['step_s_median']:.2f} s, held-out Dice "
            f"TC {stats['dice_TC']:.3f} WT {stats['dice_WT']:.3f} ET {stats['dice_ET']:.3f}",
            flush=True,
        )
    # interleaved so that machine load affects both models alike
    for rep in range(inference_repeats):
        for name in ("hlwa", "segresnet"):
            m = _measure_child(name, "infer", inference_roi, list(inference_shape), str(dev))
            results["models"][name].setdefault("infer_s", []).append(m["seconds"])
            results["models"][name]["infer_peak_gb"] = max(
                results["models"][name].get("infer_peak_gb", 0), m["peak_gb"]
            )
            print(
                f"[{name}] sliding-window inference on 4x{'x'.join(map(str, inference_shape))} (roi "
                f"{inference_roi}) run {rep + 1}: {m['seconds']:.1f} s, peak {m['peak_gb']:.2f} GB",
                flush=True,
            )
    for name in ("hlwa", "segresnet"):
        m = _measure_child(name, "train", memory_roi, list(inference_shape), str(dev))
        results["models"][name].update(train_step_roi_s=m["seconds"], train_peak_gb=m["peak_gb"])
        print(
            f"[{name}] one training step at roi {memory_roi}: {m['seconds']:.1f} s, peak {m['peak_gb']:.2f} GB",
            flush=True,
        )
    h, s = results["models"]["hlwa"], results["models"]["segresnet"]
    results["targets"] = {
        "mean_dice_at_least_segresnet": h["dice_mean"] >= s["dice_mean"],
        "inference_at_most_2x_segresnet": min(h["infer_s"]) <= 2 * min(s["infer_s"]),
        "peak_memory_under_8gb_roi128": max(h["train_peak_gb"], h["infer_peak_gb"]) < 8.0,
    }
    table = format_table(results)
    write_report(work_dir, "benchmark_hlwa", results, table)
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the benchmark, one column per model, plus the targets."""
    h, s = results["models"]["hlwa"], results["models"]["segresnet"]
    rows = [
        ("parameters (M)", "params_m", "{:.2f}"),
        ("training steps in budget", "steps", "{:d}"),
        ("training step, median (s)", "step_s_median", "{:.2f}"),
        ("held-out Dice TC", "dice_TC", "{:.3f}"),
        ("held-out Dice WT", "dice_WT", "{:.3f}"),
        ("held-out Dice ET", "dice_ET", "{:.3f}"),
        ("held-out Dice mean", "dice_mean", "{:.3f}"),
    ]
    lines = [
        f"Device {results['device']}, {results['num_cases']} synthetic cases of {results['shape']}, crops "
        f"{results['roi']}^3, {results['budget_s']:.0f} s training each, torch threads {results['torch_threads']}.",
        "",
        "| | HLWA-UNet | SegResNet (Model Zoo) |",
        "| --- | ---: | ---: |",
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(h[key])} | {fmt.format(s[key])} |")
    shape = "x".join(map(str, results["inference_shape"]))
    lines.append(
        f"| inference 4x{shape}, roi {results['inference_roi']} (s, best of {len(h['infer_s'])}) | {min(h['infer_s']):.1f} | "
        f"{min(s['infer_s']):.1f} |"
    )
    lines.append(f"| peak memory, that inference (GB) | {h['infer_peak_gb']:.2f} | {s['infer_peak_gb']:.2f} |")
    lines.append(f"| one training step at roi 128^3 (s) | {h['train_step_roi_s']:.1f} | {s['train_step_roi_s']:.1f} |")
    lines.append(f"| peak memory, that training step (GB) | {h['train_peak_gb']:.2f} | {s['train_peak_gb']:.2f} |")
    lines += [
        "",
        "Held-out mean Dice with one modality missing (zeroed after normalisation):",
        "",
        "| model | none missing | " + " | ".join(f"no {m}" for m in MODALITIES) + " |",
        "| --- | ---: |" + " ---: |" * len(MODALITIES),
    ]
    for name, stats in results["models"].items():
        if "missing_modality" in stats:
            lines.append(
                f"| {name} | {stats['dice_mean']:.3f} | "
                + " | ".join(f"{stats['missing_modality'][m]:.3f}" for m in MODALITIES)
                + " |"
            )
    lines.append("")
    for target, ok in results["targets"].items():
        lines.append(f"- {target.replace('_', ' ')}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(*sys.argv[1:])
