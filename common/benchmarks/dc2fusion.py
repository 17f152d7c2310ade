"""DC2Fusion against classical fusion baselines and plain copies of one source, after a fixed training budget.

One run: synthetic ADNI-layout MRI-PET pairs (:func:`common.data.synthetic.write.write_synthetic_dataset`) are
split into training and held-out testing subjects; a DC2Fusion network (the bundle's ``configs/train.json``:
network, loss and transforms, with the size given here) is trained for a fixed number of optimiser steps (Adam,
poly decay ``(1 - step / steps)^0.9``, batch 1, seed 3407); then every held-out case is fused by the network, by
average, maximum and Laplacian-pyramid fusion, and by two non-fusions, a plain copy of the MRI and of the PET.
Every method is scored with every metric of :class:`~common.metrics.fusion.FusionScorer` on the whole volume and
on the paper's single axial slice, in the network's input space ([0, 1], ``roi`` voxels a side).

The ranking summary is :data:`~common.metrics.fusion.RANKING_METRICS`: SSIM averaged over (F, MRI) and
(F, PET), Qabf, and ``psnr_min = min(PSNR(F, MRI), PSNR(F, PET))``. Averaged PSNR rewards copying one source
(PSNR against that source is infinite); ``psnr_min`` does not, and the benchmark reports whether the MRI copy
ranks below every real fusion. Note that voxel-wise averaging maximises ``psnr_min`` exactly: for any F,
``max(MSE(F, M), MSE(F, P)) >= mean((M - P)^2) / 4``, with equality at ``F = (M + P) / 2``; no method can beat
the average fusion on that metric, only tie it.

Every figure is measured in this run; nothing is copied from a paper.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from common.benchmarks.report import bundle_train_parser, write_report
from common.data.fusion_panel import save_fusion_panel
from common.engines.fusion_evaluation import summarize_rows
from common.io import atomic_path
from common.metrics.fusion import BASELINES, RANKING_METRICS, FusionScorer, rank_methods

__all__ = ["BUNDLE", "COPIES", "format_report", "run_benchmark"]

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundles", "adni_mri_pet_dc2fusion"
)
#: non-fusions shown next to the methods: the fused image is one source, unchanged
COPIES = ("copy_mri", "copy_pet")
METHOD = "dc2fusion"


def _parser(dataset_dir: str, datalist: str, overrides: dict[str, Any]):
    return bundle_train_parser(BUNDLE, dataset_dir, datalist, overrides)


def _poly(steps: int, power: float):
    return lambda step: max(0.0, 1.0 - step / steps) ** power


def train_fixed_steps(
    net: torch.nn.Module,
    loss_fn: torch.nn.Module,
    dataset: Any,
    steps: int,
    learning_rate: float,
    device: torch.device,
    seed: int,
    lr_power: float = 0.9,
    log_every: int = 10,
    say: Any = None,
) -> dict[str, Any]:
    """Adam with poly decay per step, batch 1, for exactly ``steps`` steps over ``dataset`` (reshuffled each pass).

    Returns ``{"seconds", "cpu_seconds", "seconds_per_step", "loss_first", "loss_last", "loss_curve"}``: wall and
    process CPU time (all threads; on a shared machine the wall time also counts the other jobs), the curve holding
    the mean loss of every ``log_every`` steps. ``say(message)`` gets a progress line every ``log_every`` steps.
    """
    from monai.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0, generator=generator)
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _poly(steps, lr_power))
    net.to(device).train()
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    step = 0
    while step < steps:
        for batch in loader:
            if step >= steps:
                break
            sources = batch["image"].to(device)  # (1, 2, D, H, W): MRI, PET
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(sources), sources)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if say is not None and step % log_every == 0:
                recent = float(np.mean(losses[-log_every:]))
                say(f"  step {step}/{steps}: loss {recent:.4f}, {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    curve = [float(np.mean(losses[i : i + log_every])) for i in range(0, len(losses), log_every)]
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "seconds_per_step": seconds / max(1, steps),
        "loss_first": float(np.mean(losses[:log_every])),
        "loss_last": float(np.mean(losses[-log_every:])),
        "loss_curve": curve,
    }


def _candidates(fused: np.ndarray, mri: np.ndarray, pet: np.ndarray) -> dict[str, np.ndarray]:
    out = {METHOD: fused}
    out.update({name: np.asarray(fn(mri, pet)) for name, fn in BASELINES.items()})
    out.update({"copy_mri": mri.copy(), "copy_pet": pet.copy()})
    return out


def _comparisons(means: dict[str, dict[str, float]], ranking: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The benchmark's claims, checked on one protocol's means and ranking."""
    fusions = [m for m in means if m not in COPIES]
    beats = {
        metric: {b: bool(means[METHOD][metric] > means[b][metric]) for b in BASELINES if b in means}
        for metric in RANKING_METRICS
    }
    copy_rank = ranking["copy_mri"]["mean_rank"]
    return {
        "dc2fusion_beats_baseline": beats,
        "dc2fusion_beats_every_baseline_on_all": all(all(v.values()) for v in beats.values()),
        "copy_mri_position": ranking["copy_mri"]["position"],
        "fusions_above_copy_mri": [m for m in fusions if ranking[m]["mean_rank"] < copy_rank],
        "copy_mri_below_a_real_fusion": any(ranking[m]["mean_rank"] < copy_rank for m in fusions),
        "copy_mri_below_every_fusion": all(ranking[m]["mean_rank"] < copy_rank for m in fusions),
        "copy_mri_below_dc2fusion": bool(ranking[METHOD]["mean_rank"] < copy_rank),
        "copy_mri_psnr_min_below_every_fusion": all(
            means["copy_mri"]["psnr_min"] < means[m]["psnr_min"] for m in fusions
        ),
    }


def run_benchmark(
    work_dir: str = "runs/benchmark_dc2fusion",
    num_cases: int = 9,
    test_fraction: float = 0.34,
    shape: Sequence[int] = (48, 48, 48),
    roi: int = 48,
    pad: int | None = None,
    steps: int = 100,
    learning_rate: float = 2e-3,
    embed_dim: int = 24,
    depths: Sequence[int] = (1, 1, 1),
    num_heads: Sequence[int] = (2, 4, 8),
    head_channels: int = 8,
    protocols: Sequence[str] = ("volume", "slice"),
    device: str = "auto",
    threads: int | None = None,
    seed: int = 3407,
    data_seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train DC2Fusion for ``steps`` steps, score it, the baselines and the copies; write JSON, Markdown and a PNG.

    Args:
        work_dir: where the data, ``benchmark_dc2fusion.json``, ``benchmark_dc2fusion.md``, the checkpoint and a
            panel of the first test case go.
        num_cases: synthetic subjects (one MRI-PET pair each).
        test_fraction: fraction of the subjects held out for scoring (the rest trains; no validation).
        shape: synthetic grid (the MNI152 field of view at ``218 / shape[1]`` mm).
        roi: network input edge in voxels (the bundle's ``roi_size``); must suit the network's size divisor.
        pad: edge of the ``SpatialPad`` before resizing (the bundle's 224 mm); default ``ceil(224 mm / spacing)``.
        steps: optimiser steps (batch 1): the fixed training budget.
        learning_rate: Adam's initial learning rate (the paper's 1e-4 suits its 500 epochs on 594 subjects; a short
            budget needs more).
        embed_dim, depths, num_heads, head_channels: network size (the bundle's ``network_def`` otherwise).
        protocols: ``"volume"`` and/or ``"slice"`` (the paper's middle axial slice).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (default: torch's choice).
        seed: seed of the weights, the augmentation and the sampling order.
        data_seed: seed of the synthetic subjects and of the split.
        verbose: print progress and the final table.

    Returns:
        the content of ``benchmark_dc2fusion.json``.
    """
    import monai
    from monai.data import Dataset

    from common.data.datalist import build_datalist, save_datalist
    from common.data.decathlon import load_datalist
    from common.data.synthetic.mri_pet import mni152_affine
    from common.data.synthetic.write import write_synthetic_dataset

    if steps < 1 or num_cases < 2 or not 0 < test_fraction < 1:
        raise ValueError(
            f"need steps >= 1, num_cases >= 2, 0 < test_fraction < 1; got {steps}, {num_cases}, {test_fraction}."
        )
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    shape = [int(s) for s in shape]
    spacing = float(abs(mni152_affine(shape)[0, 0]))
    pad = int(math.ceil(224.0 / spacing)) if pad is None else int(pad)
    work_dir = os.path.abspath(work_dir)
    data_dir = os.path.join(work_dir, "data", f"adni_pairs_{num_cases}x{'x'.join(map(str, shape))}_seed{data_seed}")

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    start = time.perf_counter()
    if not os.path.isfile(os.path.join(data_dir, ".complete")):
        say(f"writing {num_cases} synthetic MRI-PET pairs of {shape} to {data_dir}")
        write_synthetic_dataset(
            "adni_pairs", data_dir, num_cases=num_cases, shape=shape, seed=data_seed, progress=False
        )
        with open(os.path.join(data_dir, ".complete"), "w") as f:
            f.write("complete\n")
    datalist = data_dir + "_datalist.json"
    save_datalist(
        build_datalist(
            "adni_pairs", data_dir, seed=data_seed, val_fraction=0.0, test_fraction=test_fraction, progress=False
        ),
        datalist,
    )
    overrides = {
        "roi_size": [roi] * 3,
        "pad_size": [pad] * 3,
        "seed": seed,
        "network_def#embed_dim": embed_dim,
        "network_def#depths": list(depths),
        "network_def#num_heads": list(num_heads),
        "network_def#head_channels": head_channels,
    }
    parser = _parser(data_dir, datalist, overrides)
    monai.utils.set_determinism(seed=seed)
    net = parser.get_parsed_content("network_def")
    loss_fn = parser.get_parsed_content("loss")
    train_set = parser.get_parsed_content("train#dataset")
    test_items = load_datalist(datalist, "testing", data_dir)
    test_set = Dataset(test_items, transform=parser.get_parsed_content("validate#preprocessing"))
    data_seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in net.parameters())
    say(
        f"training DC2Fusion ({n_params / 1e6:.2f} M parameters) for {steps} steps on {len(train_set)} subjects, "
        f"{roi}^3 input, device {dev}"
    )
    training = train_fixed_steps(net, loss_fn, train_set, steps, learning_rate, dev, seed, say=say if verbose else None)
    say(f"trained in {training['seconds']:.0f} s ({training['seconds_per_step']:.2f} s/step)")
    ckpt = os.path.join(work_dir, "model.pt")
    with atomic_path(ckpt) as tmp:
        torch.save(net.state_dict(), tmp)

    rows: list[dict[str, Any]] = []
    net.eval()
    score_start = time.perf_counter()
    infer_seconds = []
    for k, item in enumerate(test_set):
        sources = item["image"][None].to(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            fused = net(sources)[0, 0].float().cpu().numpy().astype(np.float64)
        infer_seconds.append(time.perf_counter() - t0)
        mri, pet = (item["image"][c].cpu().numpy().astype(np.float64) for c in (0, 1))
        if k == 0:
            save_fusion_panel(
                mri,
                pet,
                fused,
                os.path.join(work_dir, "panel.png"),
                title=f"DC2Fusion after {steps} steps, {item['case']}",
            )
        candidates = _candidates(fused, mri, pet)
        for protocol in protocols:
            index = None if protocol == "volume" else mri.shape[-1] // 2
            scorer = FusionScorer(mri, pet, slice_index=index, axis=-1)
            for method, image in candidates.items():
                rows.append({"case": item["case"], "method": method, "protocol": protocol, **scorer(image)})
        say(f"scored test case {k + 1}/{len(test_set)} ({item['case']})")
    means = summarize_rows(rows)
    rankings = {p: rank_methods(m) for p, m in means.items()}
    results = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "num_subjects": num_cases,
        "num_train": len(train_set),
        "num_test": len(test_set),
        "shape": shape,
        "spacing_mm": spacing,
        "pad": pad,
        "roi": roi,
        "network": {
            "embed_dim": embed_dim,
            "depths": list(depths),
            "num_heads": list(num_heads),
            "head_channels": head_channels,
            "parameters": n_params,
        },
        "steps": steps,
        "learning_rate": learning_rate,
        "seed": seed,
        "data_seed": data_seed,
        "training": training,
        "inference_seconds_per_case": float(np.mean(infer_seconds)),
        "data_seconds": data_seconds,
        "scoring_seconds": time.perf_counter() - score_start,
        "total_seconds": time.perf_counter() - start,
        "ranking_metrics": list(RANKING_METRICS),
        "means": means,
        "ranking": rankings,
        "checks": {p: _comparisons(means[p], rankings[p]) for p in means},
        "rows": rows,
    }
    write_report(work_dir, "benchmark_dc2fusion", results, format_report(results))
    return results


_COLUMNS = ("ssim", "qabf", "psnr_min", "psnr", "nmi", "mi", "fsim", "entropy")


def _fmt(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"


def format_report(results: dict[str, Any]) -> str:
    """Markdown tables: per protocol, every method's mean metrics with its ranks, then the checks."""
    net = results["network"]
    lines = [
        f"DC2Fusion benchmark: {results['num_train']} training / {results['num_test']} test synthetic subjects, grid "
        f"{'x'.join(map(str, results['shape']))} ({results['spacing_mm']:.2f} mm), crop-pad {results['pad']}^3, input "
        f"{results['roi']}^3; network embed_dim {net['embed_dim']}, depths {net['depths']}, heads {net['num_heads']} "
        f"({net['parameters'] / 1e6:.2f} M parameters); {results['steps']} Adam steps, lr {results['learning_rate']:g} "
        f"poly 0.9, batch 1, seed {results['seed']}; device {results['device']} ({results['threads']} threads); "
        f"training {results['training']['seconds']:.0f} s wall, {results['training']['cpu_seconds']:.0f} s CPU "
        f"({results['training']['seconds_per_step']:.2f} s/step), "
        f"loss {results['training']['loss_first']:.3f} -> {results['training']['loss_last']:.3f}; "
        f"total {results['total_seconds'] / 60:.1f} min.",
        "",
    ]
    for protocol, methods in results["means"].items():
        ranking = results["ranking"][protocol]
        lines.append(f"Protocol `{protocol}` (means over test cases; ranks on {', '.join(RANKING_METRICS)}):")
        lines.append("")
        lines.append("| method | " + " | ".join(_COLUMNS) + " | ranks | mean rank |")
        lines.append("| --- " * (len(_COLUMNS) + 3) + "|")
        for method, r in ranking.items():
            ranks = "/".join(str(int(r[f"rank_{m}"])) for m in RANKING_METRICS)
            values = " | ".join(_fmt(methods[method][c]) for c in _COLUMNS)
            lines.append(f"| {method} | {values} | {ranks} | {r['mean_rank']:.2f} |")
        checks = results["checks"][protocol]
        beats = checks["dc2fusion_beats_baseline"]
        verdicts = "; ".join(
            f"{metric}: " + ", ".join(f"{b} {'yes' if won else 'no'}" for b, won in beats[metric].items())
            for metric in RANKING_METRICS
        )
        every = "yes" if checks["dc2fusion_beats_every_baseline_on_all"] else "no"
        above = ", ".join(checks["fusions_above_copy_mri"]) or "none"
        yes = {True: "yes", False: "no"}
        lines += [
            "",
            f"DC2Fusion beats each baseline? {verdicts}. All: {every}.",
            f"Copy of the MRI: position {int(checks['copy_mri_position'])}; real fusions ranked above it: {above}; "
            f"below DC2Fusion: {yes[checks['copy_mri_below_dc2fusion']]}; psnr_min below every real fusion's: "
            f"{yes[checks['copy_mri_psnr_min_below_every_fusion']]}.",
            "",
        ]
    return "\n".join(lines).rstrip()
