"""MedSegDiff samplers side by side: per-volume Dice and seconds per slice for DDPM-1000 and DDIM 10/25/50.

One run: synthetic BraTS 2021-layout data is written, the MedSegDiff bundle's own pieces (its ``configs/train.json``:
transforms, network, DDPM training scheduler, prepare-batch, training inferer, loss, EMA handler, trainer) train a
small network for a fixed number of iterations, and the EMA weights are sampled on held-out volumes with every
sampler setting:

- DDPM with all 1000 steps (``DDPMScheduler``) and DDIM with 10, 25 and 50 steps (``DDIMScheduler``, eta 0);
- ensembles of 1 and of 5 samples per slice, the 5 fused by STAPLE (ITK) and, for reference, by the mean.

Per-volume Dice (whole tumour): on each test volume a slab of ``eval_slices`` consecutive axial slices centred on
the slice with the largest tumour area is sampled by every setting, and Dice is computed over the slab as one 3D
mask (per volume, not per slice), on the network's grid (``roi`` in-plane; the label resized with nearest). DDPM-1000
costs 1000 network calls per sample, which is what limits the slab on a CPU. Timing: wall time of the sampling of
all slabs of a setting divided by the number of slices (the ensemble included); settings run interleaved volume by
volume, so that load changes on a shared machine spread over all of them. Every figure is measured in this run.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from common.benchmarks.report import bundle_train_parser, write_report

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "brats_mri_medsegdiff_segmentation",
)
#: (sampler, steps) settings benchmarked, in table order.
SETTINGS: tuple[tuple[str, int], ...] = (("ddpm", 1000), ("ddim", 10), ("ddim", 25), ("ddim", 50))


def _bundle_parser(dataset_dir: str, datalist: str, overrides: dict[str, Any]):
    """The bundle's ``train.json`` with the benchmark's paths and sizes."""
    outputs = {
        "output_dir": tempfile.mkdtemp(prefix="medsegdiff-bench-"),
        "ckpt_dir": tempfile.mkdtemp(prefix="medsegdiff-bench-"),
    }
    return bundle_train_parser(BUNDLE, dataset_dir, datalist, {**outputs, **overrides})


def tumour_slab(label: torch.Tensor, size: int) -> slice:
    """``size`` consecutive indices of the last axis centred on the slice with the largest foreground area."""
    depth = label.shape[-1]
    size = min(int(size), depth)
    area = label.reshape(-1, depth).sum(0)
    centre = int(area.argmax()) if float(area.max()) > 0 else depth // 2
    start = min(max(centre - size // 2, 0), depth - size)
    return slice(start, start + size)


def volume_dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice of two binary volumes (1.0 when both are empty)."""
    pred, label = np.asarray(pred) > 0.5, np.asarray(label) > 0.5
    total = pred.sum() + label.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, label).sum() / total)


def _make_scheduler(name: str, parser) -> Any:
    from monai.networks.schedulers import DDPMScheduler

    from common.networks.clipped_ddim import ClippedDDIMScheduler

    kwargs = {
        "num_train_timesteps": parser.get_parsed_content("num_train_timesteps"),
        "schedule": "linear_beta",
        "beta_start": parser.get_parsed_content("beta_start"),
        "beta_end": parser.get_parsed_content("beta_end"),
    }
    return DDPMScheduler(**kwargs) if name == "ddpm" else ClippedDDIMScheduler(**kwargs, clip_sample=True)


def train_fixed_budget(parser, iterations: int, num_train: int, batch_size: int) -> dict[str, Any]:
    """Train with the bundle's trainer (EMA handler included, no validation) for about ``iterations`` iterations.

    The budget is rounded up to whole epochs of ``ceil(num_train / batch_size)`` iterations.
    """
    from ignite.engine import Events
    from monai.handlers import from_engine

    epochs = max(1, math.ceil(iterations / max(math.ceil(num_train / batch_size), 1)))
    parser["train#trainer#max_epochs"] = epochs
    parser["train#trainer#train_handlers"] = "$[@ema_handler]"  # the EMA handler only
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    loss_of = from_engine(["loss"], first=True)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(loss_of(e.state.output))))
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    tail = losses[-max(len(losses) // 10, 1) :]
    return {
        "iterations": trainer.state.iteration,
        "epochs": epochs,
        "seconds": seconds,
        "seconds_per_iteration": seconds / max(trainer.state.iteration, 1),
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss_mean_last_10pct": float(np.mean(tail)) if tail else float("nan"),
    }


def evaluate_samplers(
    network: torch.nn.Module,
    volumes: Sequence[dict[str, torch.Tensor]],
    parser,
    settings: Sequence[tuple[str, int]],
    ensembles: Sequence[int],
    eval_slices: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    fusions: Sequence[str] = ("staple", "mean"),
) -> dict[str, dict[str, Any]]:
    """Sample every volume's slab with every (setting, ensemble); per-volume Dice and seconds per slice.

    Dice is recorded for the first sample alone (``dice_single``) and for each fusion method of an ensemble
    (``dice_<method>``; an ensemble of 1 is its own fusion).
    """
    from common.data.ensemble_fusion import FuseEnsembled
    from common.engines.diffusion import DiffusionSegmentationInferer

    network.eval()
    rows: dict[str, dict[str, Any]] = {}
    for name, steps in settings:
        for ensemble in ensembles:
            rows[f"{name}-{steps} x{ensemble}"] = {
                "sampler": name,
                "steps": steps,
                "ensemble": ensemble,
                "seconds": 0.0,
                "slices": 0,
                "dice_single": [],
                **{f"dice_{method}": [] for method in fusions},
            }
    for v, volume in enumerate(volumes):
        slab = tumour_slab(volume["label"], eval_slices)
        image = volume["image"][None, ..., slab].to(device)
        label = volume["label"][..., slab].numpy()
        for name, steps in settings:
            for ensemble in ensembles:
                row = rows[f"{name}-{steps} x{ensemble}"]
                inferer = DiffusionSegmentationInferer(
                    _make_scheduler(name, parser),
                    num_inference_steps=steps,
                    num_ensemble=ensemble,
                    out_channels=label.shape[0],
                    batch_size=batch_size,
                )
                torch.manual_seed(seed + v)
                start = time.perf_counter()
                samples = inferer(image, network)[0].cpu()
                row["seconds"] += time.perf_counter() - start
                row["slices"] += image.shape[-1]
                row["dice_single"].append(volume_dice(samples[: label.shape[0]].numpy(), label))
                for method in fusions:
                    if ensemble > 1:
                        fused = FuseEnsembled("pred", ensemble, method=method)({"pred": samples})["pred"]
                        row[f"dice_{method}"].append(volume_dice(fused.numpy(), label))
                    else:
                        row[f"dice_{method}"].append(row["dice_single"][-1])
    for row in rows.values():
        row["seconds_per_slice"] = row["seconds"] / max(row["slices"], 1)
        for key in ("dice_single", *(f"dice_{method}" for method in fusions)):
            row[f"mean_{key}"] = float(np.mean(row[key])) if row[key] else float("nan")
    return rows


def run_benchmark(
    work_dir: str = "runs/benchmark_medsegdiff",
    num_cases: int = 10,
    shape: Sequence[int] = (64, 64, 48),
    roi: int = 32,
    channels: Sequence[int] = (16, 32, 64),
    iterations: int = 600,
    learning_rate: float = 5e-4,
    ema_decay: float = 0.99,
    x0_loss_weight: float = 1.0,
    slices_per_volume: int = 8,
    batch_size: int = 2,
    eval_slices: int = 2,
    num_test: int = 3,
    ensembles: Sequence[int] = (1, 5),
    settings: Sequence[tuple[str, int]] = SETTINGS,
    sample_batch_size: int = 64,
    fusions: Sequence[str] = ("staple", "mean"),
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write data, train once, compare the samplers; print a table and write ``benchmark_medsegdiff.{json,md}``.

    Args:
        work_dir: where the synthetic data and the results go.
        num_cases: synthetic BraTS 2021 cases; ``num_test`` of them are held out for the comparison.
        shape: synthetic volume size (x, y, z).
        roi: in-plane slice size of the network (volumes are resized to ``roi x roi`` in-plane).
        channels: MedSegDiff feature channels per level (attention at the deepest level only).
        iterations: training budget in iterations (rounded up to whole epochs).
        learning_rate: AdamW learning rate.
        ema_decay: EMA decay of the weights that are sampled (warm-up over a third of the iterations).
        x0_loss_weight: weight of the auxiliary Dice loss on the predicted ``x_0`` (the bundle's default is 0, the
            paper's loss; a budget of a few hundred CPU iterations needs it, see the model card).
        slices_per_volume: training slices drawn per volume per iteration (half with tumour).
        batch_size: volumes per training iteration.
        eval_slices: slab thickness (axial slices) sampled per test volume by every setting.
        num_test: held-out volumes.
        ensembles: ensemble sizes.
        settings: ``(sampler, steps)`` pairs, sampler ``"ddpm"`` (steps must be 1000) or ``"ddim"``.
        sample_batch_size: (slice, sample) pairs per network call when sampling.
        fusions: ensemble fusion methods compared (``"staple"``, ``"mean"``); the first is the headline figure.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: PyTorch intra-op threads (``None``: PyTorch's default). On a CPU shared with other jobs, 1 thread
            avoids the multi-threaded kernels waiting for a second core at every operation.
        seed: data, training and sampling seed.
    """
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from common.data.datalist import build_datalist, save_datalist
    from common.data.decathlon import load_datalist
    from common.data.synthetic.write import write_synthetic_dataset

    if num_test < 1 or num_cases < num_test + 2:
        raise ValueError(f"num_cases ({num_cases}) must leave at least 2 training cases after num_test ({num_test}).")
    if roi % 2 ** (len(channels) - 1):
        raise ValueError(f"roi ({roi}) must be divisible by 2**(len(channels)-1) = {2 ** (len(channels) - 1)}.")
    device_name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch_device = torch.device(device_name)
    work_dir = os.path.abspath(work_dir)
    shape = [int(s) for s in shape]
    data_dir = os.path.join(work_dir, f"brats2021_{num_cases}x{'x'.join(map(str, shape))}_seed{seed}")
    if not os.path.isfile(os.path.join(data_dir, ".complete")):
        print(f"writing {num_cases} synthetic BraTS 2021 cases of {shape} to {data_dir}", flush=True)
        write_synthetic_dataset("brats2021", data_dir, num_cases=num_cases, shape=shape, seed=seed)
        with open(os.path.join(data_dir, ".complete"), "w") as f:
            f.write("complete\n")
    datalist = build_datalist(
        "brats2021", data_dir, seed=seed, val_fraction=0.0, test_fraction=num_test / num_cases, progress=False
    )
    datalist_path = os.path.join(work_dir, "datalist.json")
    save_datalist(datalist, datalist_path)

    set_determinism(seed=seed)
    overrides = {
        "device": device_name,
        "roi_size": [roi, roi],
        "network_def#channels": list(channels),
        "network_def#attention_levels": [False] * (len(channels) - 1) + [True],
        "network_def#norm_num_groups": min(8, channels[0]),
        "learning_rate": learning_rate,
        "ema_decay": ema_decay,
        "ema_warmup_iters": max(iterations // 3, 1),
        "x0_loss_weight": x0_loss_weight,
        "slices_per_volume": slices_per_volume,
        "batch_size": batch_size,
        "cache_rate": 1.0,
    }
    parser = _bundle_parser(data_dir, datalist_path, overrides)
    print(f"training {iterations} iterations (roi {roi}, channels {list(channels)}) on {device_name} ...", flush=True)
    training = train_fixed_budget(parser, iterations, len(datalist["training"]), batch_size)
    print(
        f"  {training['iterations']} iterations in {training['seconds']:.0f} s, loss {training['first_loss']:.3f} -> "
        f"{training['final_loss_mean_last_10pct']:.3f}",
        flush=True,
    )
    ema_network = parser.get_parsed_content("ema_network")

    load = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    volumes = [load(item) for item in load_datalist(datalist_path, "testing", data_dir)]
    print(f"sampling {len(volumes)} test volumes x {eval_slices} slices with {len(settings)} samplers ...", flush=True)
    rows = evaluate_samplers(
        ema_network, volumes, parser, settings, ensembles, eval_slices, sample_batch_size, torch_device, seed, fusions
    )
    headline = f"mean_dice_{fusions[0]}"
    reference = {e: rows.get(f"ddpm-1000 x{e}") for e in ensembles}
    for row in rows.values():
        ref = reference.get(row["ensemble"])
        row["speedup_vs_ddpm1000"] = ref["seconds_per_slice"] / row["seconds_per_slice"] if ref else None
        row["dice_minus_ddpm1000"] = row[headline] - ref[headline] if ref else None
    results = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "data": {"layout": "brats2021", "num_cases": num_cases, "shape": shape, "num_test": len(volumes), "seed": seed},
        "network": {
            "channels": list(channels),
            "roi": roi,
            "parameters": sum(p.numel() for p in ema_network.parameters()),
        },
        "loss": {"x0_loss_weight": x0_loss_weight, "learning_rate": learning_rate, "ema_decay": ema_decay},
        "training": training,
        "evaluation": {"slices_per_volume": eval_slices, "ensembles": list(ensembles), "fusions": list(fusions)},
        "rows": rows,
    }
    table = format_table(results)
    write_report(work_dir, "benchmark_medsegdiff", results, table)
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per (sampler, steps, ensemble)."""
    fusions = results["evaluation"]["fusions"]
    names = {"staple": "STAPLE", "mean": "mean"}
    header = " | ".join(f"Dice ({names.get(m, m)})" for m in fusions)
    lines = [
        f"| sampler | steps | ensemble | {header} | Dice (1st sample) | s / slice | speed-up vs DDPM-1000 |",
        "| --- | ---: | ---: | " + "---: | " * len(fusions) + "---: | ---: | ---: |",
    ]
    for row in results["rows"].values():
        speed = row.get("speedup_vs_ddpm1000")
        dice = " | ".join(f"{row[f'mean_dice_{m}']:.3f}" for m in fusions)
        speed_text = f"{speed:.1f}x" if speed is not None else ""
        lines.append(
            f"| {row['sampler'].upper()} | {row['steps']} | {row['ensemble']} | {dice} | {row['mean_dice_single']:.3f} "
            f"| {row['seconds_per_slice']:.3f} | {speed_text} |"
        )
    info = results["training"]
    lines.append("")
    lines.append(
        f"{results['data']['num_test']} test volumes x {results['evaluation']['slices_per_volume']} axial slices "
        f"(per-volume Dice over the slab), roi {results['network']['roi']}, channels {results['network']['channels']} "
        f"({results['network']['parameters'] / 1e6:.2f} M parameters), {info['iterations']} training iterations in "
        f"{info['seconds']:.0f} s (x0 loss weight {results['loss']['x0_loss_weight']}), device {results['device']} "
        f"({results['threads']} threads)."
    )
    return "\n".join(lines)
