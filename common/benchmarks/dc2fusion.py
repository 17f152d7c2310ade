"""DC2Fusion against classical fusion baselines, after a fixed budget of optimiser steps, on synthetic MRI-PET pairs.

One run: synthetic ADNI-layout MRI-PET pairs (:func:`common.data.synthetic.write.write_synthetic_dataset`) are
split by subject into training and held-out test pairs. For each seed, the bundle's own trainer
(``configs/train.json``: network, loss, Adam, transforms, data loader) trains DC2Fusion for ``steps`` optimiser steps
through :func:`common.benchmarks.budget.train_with_budget`, with the bundle's poly decay stepped per iteration over
the step budget (:func:`step_budget_overrides`: ``lr_k = lr (1 - k / steps)^0.9``).
Every held-out pair is then fused by the network, by the classical baselines of
:mod:`common.networks.fusion_baselines` (average, maximum, Laplacian pyramid, guided filter), by two non-fusions
(a plain copy of the MRI, the sanity row, and of the PET), and by the *loss optimum*: the fused volume itself
optimised by Adam on the DC2Fusion loss against that pair's own sources, the output any network trained on this
loss is pulled towards, whatever its size and budget (a diagnostic, not a method: it sees the test pair).
Every method is scored with every metric of :class:`~common.metrics.fusion.FusionScorer` on the whole volume and
on the paper's middle axial slice, in the network's input space ([0, 1], ``roi`` voxels a side).

Targets (:data:`TARGETS`, fixed before any result was seen; judged on the ``volume`` protocol, the ``slice``
verdicts are reported too): DC2Fusion beats the average, maximum and Laplacian-pyramid fusion on mean SSIM over
(F, MRI) and (F, PET), on Qabf and on MI; and its ``psnr_min = min(PSNR(F, MRI), PSNR(F, PET))`` is within 1 dB of
the average fusion's. The average is the unique maximiser of ``psnr_min`` (for any F, ``max(MSE(F, M), MSE(F, P))
>= mean((M - P)^2) / 4``, with equality only at ``F = (M + P) / 2``), hence "within 1 dB" rather than "beats". A
target is met when the mean over held-out pairs of *every* seed meets it; the figures are mean +- sd over the
held-out pairs, per seed.

Resumable: each seed's training, the baselines and the loss optimum are separate runs (:func:`cached_run`), filed
under a hash of their settings in ``<work_dir>/runs``; a killed benchmark, started again, trains only what is
missing. Seeds can run in separate processes (``--seeds 3407`` and ``--seeds 3408`` at once, then both together
for the report). Every figure is measured in this run; nothing is copied from a paper.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from common.benchmarks.budget import cached_run, train_with_budget
from common.benchmarks.report import bundle_train_parser, write_report
from common.data.fusion_panel import save_fusion_panel
from common.engines.fusion_evaluation import summarize_rows
from common.io import atomic_path
from common.metrics.fusion import FusionScorer
from common.networks.fusion_baselines import BASELINES

__all__ = [
    "BUNDLE",
    "COPIES",
    "HEADS",
    "LOSS_OPTIMUM",
    "LR_HANDLER",
    "TARGETS",
    "format_report",
    "judge_targets",
    "loss_optimal_fusion",
    "run_benchmark",
    "step_budget_overrides",
]

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundles", "adni_mri_pet_dc2fusion"
)
METHOD = "dc2fusion"
#: non-fusions shown next to the methods: the fused image is one source, unchanged (the MRI copy is the sanity row)
COPIES = ("copy_mri", "copy_pet")
#: the fused volume optimised directly on the DC2Fusion loss, per held-out pair (a diagnostic row)
LOSS_OPTIMUM = "loss_optimum"
#: the baselines the targets name (the guided filter is reported, not targeted)
TARGET_BASELINES = ("average", "maximum", "laplacian_pyramid")
#: ``(metric, kind, reference, margin)``: ``beats`` every reference baseline, or ``within`` ``margin`` of it
TARGETS = (
    ("ssim", "beats", TARGET_BASELINES, 0.0),
    ("qabf", "beats", TARGET_BASELINES, 0.0),
    ("mi", "beats", TARGET_BASELINES, 0.0),
    ("psnr_min", "within", ("average",), 1.0),
)
#: config id of the bundle's ``LrScheduleHandler``, the one training handler the benchmark keeps
LR_HANDLER = "train#handlers#0"
#: fusion-head variants of the network (``network_def`` overrides); ``paper`` is the bundle's default
HEADS: dict[str, dict[str, Any]] = {
    "paper": {},
    "abs": {"network_def#output_activation": "abs"},
    "normalized_projection_abs": {
        "network_def#normalize_fusion_weights": True,
        "network_def#fusion_projection": True,
        "network_def#head_channels": 8,
        "network_def#output_activation": "abs",
    },
}


def loss_optimal_fusion(
    mri: np.ndarray, pet: np.ndarray, loss_fn: torch.nn.Module, steps: int = 300, learning_rate: float = 0.01
) -> tuple[np.ndarray, float]:
    """The fused volume that minimises ``loss_fn(F, MRI, PET)`` over ``F`` itself: ``(D, H, W) x 2 -> (D, H, W)``.

    Adam on the voxels of ``F`` from the average ``(MRI + PET) / 2``, for ``steps`` steps (300 at 0.01 reach the
    plateau on 48^3 pairs: the loss changes by < 1e-3 after 100; starting from the MRI gives the same optimum).
    It is the output a network trained on this loss is pulled towards, with no limit of capacity or budget.

    Returns:
        the optimised ``F`` (float64) and its final loss.
    """
    m = torch.as_tensor(mri, dtype=torch.float32)[None, None]
    p = torch.as_tensor(pet, dtype=torch.float32)[None, None]
    fused = ((m + p) / 2).requires_grad_(True)
    optimiser = torch.optim.Adam([fused], lr=learning_rate)
    loss = torch.zeros(())
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(fused, m, p)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = float(loss_fn(fused, m, p))
    return fused.detach()[0, 0].double().numpy(), final


def step_budget_overrides(steps: int, learning_rate: float) -> dict[str, Any]:
    """Bundle overrides that run the poly decay per iteration over a budget of ``steps`` optimiser steps.

    ``lr_k = learning_rate * (1 - k / steps)^lr_power`` after ``k`` steps (``PolynomialLR`` with ``total_iters =
    steps``, stepped by the bundle's ``LrScheduleHandler`` (:data:`LR_HANDLER`) at every iteration instead of every
    epoch), so the schedule ends at 0 exactly when the budget is spent, whatever the number of training subjects.
    """
    return {
        "learning_rate": learning_rate,
        "lr_epoch_level": False,
        "lr_scheduler#total_iters": int(steps),
        LR_HANDLER + "#print_lr": False,
    }


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _score(case: str, method: str, fused: np.ndarray, scorers: dict[str, FusionScorer]) -> list[dict[str, Any]]:
    return [{"case": case, "method": method, "protocol": p, **scorer(fused)} for p, scorer in scorers.items()]


def _mean_sd(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{protocol: {method: {metric: [mean, sd]}}}`` over the cases (sd with ddof 1; NaN for one case)."""
    means = summarize_rows(rows)
    sds = summarize_rows(rows, reduce=lambda a: float(np.std(a, ddof=1)) if a.size > 1 else math.nan)
    return {
        p: {m: {k: [v, sds[p][m][k]] for k, v in values.items()} for m, values in methods.items()}
        for p, methods in means.items()
    }


def judge_targets(
    means: dict[str, dict[str, float]], model_rows: Sequence[str], targets: Sequence[tuple] = TARGETS
) -> list[dict[str, Any]]:
    """Each target against one protocol's means: ``means[method][metric]``; ``model_rows`` are the seeds' rows.

    Returns one dict per target: ``metric``, ``kind``, ``threshold`` (the value to beat, or the lowest allowed:
    the reference minus the margin), ``reference`` (the baseline that sets it), ``values`` (per model row),
    ``met_per_row`` and ``met`` (every row meets it).
    """
    verdicts = []
    for metric, kind, references, margin in targets:
        if kind == "beats":
            reference = max(references, key=lambda b: means[b][metric])
            threshold = means[reference][metric]
            met = {r: bool(means[r][metric] > threshold) for r in model_rows}
        elif kind == "within":
            reference = references[0]
            threshold = means[reference][metric] - margin
            met = {r: bool(means[r][metric] >= threshold) for r in model_rows}
        else:
            raise ValueError(f"unknown target kind {kind!r}.")
        verdicts.append(
            {
                "metric": metric,
                "kind": kind,
                "margin": margin,
                "reference": reference,
                "threshold": threshold,
                "values": {r: means[r][metric] for r in model_rows},
                "met_per_row": met,
                "met": all(met.values()),
            }
        )
    return verdicts


def _winners(means: dict[str, dict[str, float]], metrics: Sequence[str], exclude: Sequence[str]) -> dict[str, str]:
    """Per metric, the method with the highest mean (NaN never wins), among the methods not in ``exclude``."""
    out = {}
    for metric in metrics:
        values = {m: v[metric] for m, v in means.items() if m not in exclude and not math.isnan(v[metric])}
        out[metric] = max(values, key=values.get) if values else ""
    return out


def run_benchmark(
    work_dir: str = "runs/benchmark_dc2fusion",
    num_cases: int = 20,
    test_fraction: float = 0.4,
    shape: Sequence[int] = (48, 48, 48),
    roi: int = 48,
    pad: int | None = None,
    steps: int = 4000,
    checkpoint_steps: Sequence[int] = (500, 1000, 2000, 3000),
    learning_rate: float = 2e-3,
    seeds: Sequence[int] = (3407, 3408),
    heads: Sequence[str] = ("paper",),
    embed_dim: int = 24,
    depths: Sequence[int] = (1, 1, 1),
    num_heads: Sequence[int] = (2, 4, 8),
    protocols: Sequence[str] = ("volume", "slice"),
    loss_optimum_steps: int = 300,
    device: str = "cpu",
    threads: int | None = None,
    data_seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train DC2Fusion per seed (and head variant), score it, the baselines, the copies and the loss optimum.

    Args:
        work_dir: where the data, ``runs/`` (one JSON per finished run), ``benchmark_dc2fusion.json``,
            ``benchmark_dc2fusion.md``, the weights and a panel of the first test pair per run go.
        num_cases: synthetic subjects (one MRI-PET pair each).
        test_fraction: fraction of the subjects held out for scoring (the rest trains; no validation).
        shape: synthetic grid (the MNI152 field of view at ``218 / shape[1]`` mm).
        roi: network input edge in voxels (the bundle's ``roi_size``); must suit the network's size divisor.
        pad: edge of the ``SpatialPad`` before resizing (the bundle's 224 mm); default ``ceil(224 mm / spacing)``.
        steps: optimiser steps (batch 1): the training budget, the same for every run.
        checkpoint_steps: extra held-out evaluations during training (a learning curve; the poly schedule runs over
            ``steps``, so step 1000 of a 4000-step run is not a 1000-step run).
        learning_rate: Adam's initial learning rate (the paper's 1e-4 suits its 500 epochs on 594 subjects; a short
            budget needs more).
        seeds: training seeds (weights, augmentation, sampling order).
        heads: fusion-head variants to train, names of :data:`HEADS` (default the paper's only).
        embed_dim, depths, num_heads: network size (the rest is the bundle's ``network_def``).
        protocols: ``"volume"`` and/or ``"slice"`` (the paper's middle axial slice); the targets use the first.
        loss_optimum_steps: Adam steps of :func:`loss_optimal_fusion` per test pair (0: no loss-optimum row).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (default: torch's choice).
        data_seed: seed of the synthetic subjects and of the split.
        verbose: print progress and the final table.

    Returns:
        the content of ``benchmark_dc2fusion.json``.
    """
    from monai.data import Dataset

    from common.data.datalist import build_datalist, save_datalist
    from common.data.decathlon import load_datalist
    from common.data.synthetic.mri_pet import mni152_affine
    from common.data.synthetic.write import write_synthetic_dataset

    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads or not seeds:
        raise ValueError(f"need at least one seed and head; unknown heads {unknown}, choose from {sorted(HEADS)}.")
    if steps < 1 or num_cases < 2 or not 0 < test_fraction < 1:
        raise ValueError(
            f"need steps >= 1, num_cases >= 2, 0 < test_fraction < 1; got {steps}, {num_cases}, {test_fraction}."
        )
    if threads is not None:
        torch.set_num_threads(int(threads))
    say = print if verbose else (lambda _msg: None)
    shape = [int(s) for s in shape]
    spacing = float(abs(mni152_affine(shape)[0, 0]))
    pad = int(math.ceil(224.0 / spacing)) if pad is None else int(pad)
    work_dir = os.path.abspath(work_dir)
    data_dir = os.path.join(work_dir, "data", f"adni_pairs_{num_cases}x{'x'.join(map(str, shape))}_seed{data_seed}")
    runs_dir = os.path.join(work_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)

    start = time.perf_counter()
    if not os.path.isdir(data_dir):  # written aside and renamed, so seeds started in parallel never see half of it
        say(f"writing {num_cases} synthetic MRI-PET pairs of {shape} to {data_dir}")
        partial = f"{data_dir}.partial-{os.getpid()}"
        write_synthetic_dataset("adni_pairs", partial, num_cases=num_cases, shape=shape, seed=data_seed, progress=False)
        try:
            os.rename(partial, data_dir)
        except OSError:  # another process renamed its identical copy first
            shutil.rmtree(partial)
    datalist = data_dir + "_datalist.json"
    save_datalist(
        build_datalist(
            "adni_pairs", data_dir, seed=data_seed, val_fraction=0.0, test_fraction=test_fraction, progress=False
        ),
        datalist,
    )
    data = {"num_cases": num_cases, "test_fraction": test_fraction, "shape": shape, "data_seed": data_seed}
    data.update({"pad": pad, "roi": roi})
    base = {
        "roi_size": [roi] * 3,
        "pad_size": [pad] * 3,
        "device": device,
        "amp": False,
        "network_def#embed_dim": embed_dim,
        "network_def#depths": list(depths),
        "network_def#num_heads": list(num_heads),
    }
    parser = bundle_train_parser(BUNDLE, data_dir, datalist, dict(base))
    test_items = load_datalist(datalist, "testing", data_dir)
    test_set = Dataset(test_items, transform=parser.get_parsed_content("validate#preprocessing"))
    cases = [(item["case"], item["image"]) for item in test_set]  # (2, roi, roi, roi): MRI, PET in [0, 1]
    num_train = len(load_datalist(datalist, "training", data_dir))
    sources = {case: (image[0].double().numpy(), image[1].double().numpy()) for case, image in cases}
    scorers = {
        case: {
            p: FusionScorer(m, pt, slice_index=None if p == "volume" else m.shape[-1] // 2, axis=-1) for p in protocols
        }
        for case, (m, pt) in sources.items()
    }
    first = protocols[0]
    say(
        f"{num_train} training / {len(cases)} test pairs, input {roi}^3; data ready in {time.perf_counter() - start:.0f} s"
    )

    def train_run(model: str, head: str, seed: int) -> dict[str, Any]:
        overrides = {**base, **HEADS[head], "seed": seed, **step_budget_overrides(steps, learning_rate)}
        run_parser = bundle_train_parser(BUNDLE, data_dir, datalist, overrides)

        def fuse_all(net: torch.nn.Module) -> dict[str, np.ndarray]:
            net.eval()
            with torch.no_grad():
                out = {c: net(img[None].to(device))[0, 0].double().cpu().numpy() for c, img in cases}
            net.train()
            return out

        def evaluate(p: Any, trainer: Any) -> dict[str, float]:
            fused = fuse_all(p.get_parsed_content("network"))
            rows = [r for c, f in fused.items() for r in _score(c, model, f, {first: scorers[c][first]})]
            means = summarize_rows(rows)[first][model]
            return {k: means[k] for k in ("ssim", "qabf", "mi", "psnr_min")}

        result = train_with_budget(
            run_parser,
            model=model,
            seed=seed,
            max_steps=steps,
            checkpoint_steps=checkpoint_steps,
            evaluate=evaluate,
            keep_handlers=[LR_HANDLER],
            progress=say,
        )
        net = run_parser.get_parsed_content("network")
        t0 = time.perf_counter()
        fused = fuse_all(net)
        result["inference_seconds_per_case"] = (time.perf_counter() - t0) / len(cases)
        result["parameters"] = sum(p.numel() for p in net.parameters())
        result["learning_rate_last"] = float(run_parser.get_parsed_content("optimizer").param_groups[0]["lr"])
        result["rows"] = [r for c, f in fused.items() for r in _score(c, model, f, scorers[c])]
        tag = f"{head}_seed{seed}"
        with atomic_path(os.path.join(work_dir, f"model_{tag}.pt")) as tmp:
            torch.save(net.state_dict(), tmp)
        case0 = cases[0][0]
        save_fusion_panel(
            *sources[case0],
            fused[case0],
            os.path.join(work_dir, f"panel_{tag}.png"),
            title=f"DC2Fusion ({head} head), seed {seed}, {steps} steps, {case0}",
        )
        return result

    runs: dict[str, dict[str, Any]] = {}
    settings = {**data, **base, "steps": steps, "checkpoint_steps": list(checkpoint_steps), "lr": learning_rate}
    for head in heads:
        for seed in seeds:
            key = _settings_key({**settings, "head": HEADS[head], "seed": seed})
            path = os.path.join(runs_dir, f"{METHOD}_{head}_seed{seed}_{key}.json")
            name = f"{METHOD}_{head}_seed{seed}"  # each seed is a row of its own in the tables
            say(f"DC2Fusion, {head} head, seed {seed}: {steps} steps ({path})")
            runs[name] = cached_run(path, lambda n=name, h=head, s=seed: train_run(n, h, s), say=say)

    def reference_rows() -> dict[str, Any]:
        rows = []
        for case, (m, p) in sources.items():
            rows += _score(case, "copy_mri", m, scorers[case])
            rows += _score(case, "copy_pet", p, scorers[case])
            for name, fn in BASELINES.items():
                rows += _score(case, name, np.asarray(fn(m, p)), scorers[case])
        return {"rows": rows}

    key = _settings_key({**data, "baselines": list(BASELINES)})
    reference = cached_run(os.path.join(runs_dir, f"baselines_{key}.json"), reference_rows, say=say)

    def optimum_rows() -> dict[str, Any]:
        loss_fn = parser.get_parsed_content("loss")
        rows, losses = [], []
        for k, (case, (m, p)) in enumerate(sources.items()):
            fused, loss = loss_optimal_fusion(m, p, loss_fn, steps=loss_optimum_steps)
            losses.append(loss)
            rows += _score(case, LOSS_OPTIMUM, fused, scorers[case])
            say(f"loss optimum {k + 1}/{len(sources)} ({case}): loss {loss:.4f}")
        return {"rows": rows, "loss": losses, "steps": loss_optimum_steps}

    optimum: dict[str, Any] = {"rows": []}
    if loss_optimum_steps > 0:
        key = _settings_key({**data, "steps": loss_optimum_steps, "loss": parser.get("loss")})
        optimum = cached_run(os.path.join(runs_dir, f"{LOSS_OPTIMUM}_{key}.json"), optimum_rows, say=say)

    rows = [r for run in runs.values() for r in run["rows"]] + reference["rows"] + optimum["rows"]
    stats = _mean_sd(rows)
    means = {
        p: {m: {k: v[0] for k, v in values.items()} for m, values in methods.items()} for p, methods in stats.items()
    }
    model_rows = list(runs)
    results = {
        "synthetic": True,
        **data,
        "spacing_mm": spacing,
        "num_train": num_train,
        "num_test": len(cases),
        "network": {"embed_dim": embed_dim, "depths": list(depths), "num_heads": list(num_heads)},
        "heads": {h: HEADS[h] for h in heads},
        "steps": steps,
        "learning_rate": learning_rate,
        "seeds": list(seeds),
        "device": device,
        "threads": torch.get_num_threads(),
        "training": {name: {k: v for k, v in run.items() if k != "rows"} for name, run in runs.items()},
        "loss_optimum": {k: v for k, v in optimum.items() if k != "rows"},
        "total_seconds": time.perf_counter() - start,
        "targets_protocol": first,
        "stats": stats,
        "winners": {
            p: _winners(
                m, ("ssim", "qabf", "mi", "psnr_min", "psnr", "nmi", "fsim", "entropy"), (*COPIES, LOSS_OPTIMUM)
            )
            for p, m in means.items()
        },
        "targets": {p: judge_targets(m, model_rows) for p, m in means.items()},
        "rows": rows,
    }
    write_report(work_dir, "benchmark_dc2fusion", results, format_report(results))
    return results


_COLUMNS = ("ssim", "qabf", "mi", "psnr_min", "psnr", "nmi", "fsim", "entropy")


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return "inf" if value == math.inf else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def format_report(results: dict[str, Any]) -> str:
    """Markdown: the setting and run times, per protocol every method's mean +- sd, the winners and the targets."""
    net = results["network"]
    lines = [
        f"DC2Fusion benchmark (synthetic MRI-PET pairs): {results['num_train']} training / {results['num_test']} "
        f"held-out subjects, grid {'x'.join(map(str, results['shape']))} ({results['spacing_mm']:.2f} mm), crop-pad "
        f"{results['pad']}^3, input {results['roi']}^3; network embed_dim {net['embed_dim']}, depths {net['depths']}, "
        f"heads {net['num_heads']}; {results['steps']} Adam steps per run, lr {results['learning_rate']:g} with poly "
        f"0.9 decay over the steps, batch 1; device {results['device']} ({results['threads']} threads); "
        f"total {results['total_seconds'] / 60:.1f} min (reused runs count 0).",
        "",
        "| run | parameters | steps | training (s) | s/step (median) | loss first -> last | inference (s/pair) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, run in results["training"].items():
        lines.append(
            f"| {name} | {run['parameters'] / 1e6:.2f} M | {run['steps']} | {run['train_seconds']:.0f} | "
            f"{run['step_seconds_median']:.3f} | {run['loss_first']:.3f} -> {run['loss_last']:.3f} | "
            f"{run['inference_seconds_per_case']:.2f} |"
        )
    lines += ["", "Learning curve (held-out means, volume protocol; the schedule runs over the whole budget):", ""]
    lines += ["| run | step | SSIM | Qabf | MI | psnr_min |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, run in results["training"].items():
        for c in run["checkpoints"]:
            m = c["metrics"]
            lines.append(
                f"| {name} | {c['steps']} | {m['ssim']:.4f} | {m['qabf']:.4f} | {m['mi']:.4f} | {m['psnr_min']:.2f} |"
            )
    for protocol, methods in results["stats"].items():
        lines += [
            "",
            f"Protocol `{protocol}`: mean +- sd over the {results['num_test']} held-out pairs:",
            "",
            "| method | " + " | ".join(_COLUMNS) + " |",
            "| --- " * (len(_COLUMNS) + 1) + "|",
        ]
        for method, values in methods.items():
            cells = " | ".join(f"{_fmt(values[c][0])} +- {_fmt(values[c][1])}" for c in _COLUMNS)
            lines.append(f"| {method} | {cells} |")
        winners = results["winners"][protocol]
        lines += [
            "",
            "Winner per metric (copies and the loss optimum excluded): "
            + ", ".join(f"{metric} {method}" for metric, method in winners.items())
            + ".",
        ]
        lines += ["", "| target | threshold | " + " | ".join(results["training"]) + " | met |"]
        lines.append("| --- | ---: | " + "---: | " * len(results["training"]) + "--- |")
        for t in results["targets"][protocol]:
            what = (
                f"{t['metric']} > {t['reference']}"
                if t["kind"] == "beats"
                else f"{t['metric']} >= {t['reference']} - {t['margin']:g}"
            )
            cells = " | ".join(
                f"{_fmt(t['values'][r])} ({'yes' if t['met_per_row'][r] else 'no'})" for r in results["training"]
            )
            lines.append(f"| {what} | {_fmt(t['threshold'])} | {cells} | {'MET' if t['met'] else 'missed'} |")
    return "\n".join(lines).rstrip()
