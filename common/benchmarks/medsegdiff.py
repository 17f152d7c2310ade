"""MedSegDiff against its own question: does diffusion beat a deterministic network with the same backbone?

Protocol, fixed before any result was seen (the same as the HLWA benchmark's where it applies):

- Data: synthetic BraTS 2021-layout cases (``phantom="realistic"`` by default, the harder phantom of
  :mod:`common.data.synthetic.brain`), written once; ``num_test`` (>= 12) held-out cases, no validation list.
- Models (:data:`MODELS`), all built from the bundle's own ``configs/train.json`` with the recipe of its demo profile
  (``configs/pipeline.json``, stage ``train``, profile ``demo``: roi, channels, learning rate, EMA, auxiliary
  ``x_0`` loss, slices per volume), trained by the bundle's trainer through
  :func:`~common.benchmarks.budget.train_with_budget` (the EMA handler kept):

  - ``medsegdiff``: the bundle's default, the paper's attentive fusion ``A = (LN(m_I) * LN(m_x)) * m_I``;
  - ``medsegdiff_residual_fusion``: the same with the residual form ``m_I + A`` (``fusion_residual=True``);
  - ``deterministic``: the same backbone as a plain segmentation network,
    :class:`~common.networks.medsegdiff.DeterministicMedSegDiff` (noisy-mask input zeroed, ``t = 0``, one forward
    pass), trained with Dice + BCE (MONAI's ``DiceCELoss(sigmoid=True)``) instead of the diffusion loss.

  Same data, same crops, same augmentation and the same order for every model of a seed: the data loader gets its
  own generator seeded by the seed, and each run records a fingerprint of its first batches
  (:class:`BatchFingerprint`), which the report compares across models.
- Budget: ``budget_s`` seconds of training per run (evaluations excluded), reported with the optimiser steps it
  bought; ``seeds`` seeds (>= 3). Learning curve: held-out Dice (diffusion: DDIM 10 steps, 1 sample; deterministic:
  one pass) of the EMA weights at ``curve_points`` evenly spaced training times.
- Evaluation on whole volumes: every axial slice of every held-out case (slices without brain get an empty mask,
  as in the bundle), Dice per volume on the input grid after the bundle's own inverse transforms, averaged over the
  mask channels (whole tumour by default). Diffusion models: DDIM 10 steps x 5 samples fused by STAPLE (the
  headline) and x 1 sample; deterministic: one pass, ``sigmoid > 0.5``.
- Samplers (model ``medsegdiff``, every seed, the first ``ddpm_cases`` held-out cases, 1 sample): DDPM 1000 steps,
  DDIM 10 and DPM-Solver++(2M) 10 on the same whole volumes from the same initial noise; seconds of sampling per
  volume, interleaved case by case. Target: DDIM-10 at least 100x faster than DDPM-1000 with a mean Dice no more
  than 0.01 below it (paired over seeds x cases).
- Fusion decision rule: the residual form is needed (and stays the bundle's default) only if its mean Dice over
  seeds exceeds the paper form's by more than 0.01.
- Reported: per model mean +- sd over seeds of the per-seed mean Dice; a paired per-case comparison (each case's
  Dice averaged over seeds; mean difference, its 95 % interval, wins, Wilcoxon signed-rank p); every run.

Resumable: each training run, its final evaluation and each seed's sampler comparison is one
:func:`~common.benchmarks.budget.cached_run` file under ``work_dir/runs``; the trained EMA weights are kept next to
it. :func:`format_report` and :func:`plot_learning_curve` turn the report JSON into the model card's section
(:func:`update_model_card`, which also writes ``eval_metrics`` into ``metadata.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from common.benchmarks.budget import cached_run, train_with_budget
from common.benchmarks.report import bundle_train_parser, model_names, write_report
from common.io import atomic_path

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "brats_mri_medsegdiff_segmentation",
)
#: model name -> (kind, overrides of the bundle's train.json on top of the demo recipe)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "medsegdiff": ("diffusion", {"network_def#fusion_residual": False}),
    "medsegdiff_residual_fusion": ("diffusion", {"network_def#fusion_residual": True}),
    "deterministic": (
        "deterministic",
        {
            "network_def#_target_": "common.networks.medsegdiff.DeterministicMedSegDiff",
            "network_def#fusion_residual": False,
            "loss": {"_target_": "DiceCELoss", "sigmoid": True},
            "train#prepare_batch": "$monai.engines.default_prepare_batch",
            "train#inferer": {"_target_": "SimpleInferer"},
        },
    ),
}
#: the demo profile's training overrides that are not part of the recipe (run length, logging, threads)
NOT_RECIPE = ("epochs", "val_interval", "val_num_inference_steps", "num_threads", "num_workers")
#: (sampler, steps) of the sampler comparison, the reference first
SAMPLERS: tuple[tuple[str, int], ...] = (("ddpm", 1000), ("ddim", 10), ("dpm_solver", 10))
#: headline evaluation of the diffusion models: DDIM steps, ensemble size (fused by STAPLE)
HEADLINE = ("ddim", 10, 5)
TARGET_SPEEDUP, TARGET_DICE_GAP, FUSION_MARGIN = 100.0, 0.01, 0.01
CARD_START, CARD_END = (
    "<!-- benchmark:start (generated by tools/benchmark_medsegdiff.py card) -->",
    "<!-- benchmark:end -->",
)


def demo_recipe(bundle_dir: str = BUNDLE) -> dict[str, Any]:
    """The training overrides of the bundle's demo profile (``configs/pipeline.json``), minus :data:`NOT_RECIPE`."""
    with open(os.path.join(bundle_dir, "configs", "pipeline.json")) as f:
        stages = json.load(f)["stages"]
    train = next(s for s in stages if s["name"] == "train")
    recipe = {**train.get("overrides", {}), **train.get("demo", {})}
    return {k: v for k, v in recipe.items() if k not in NOT_RECIPE}


class BatchFingerprint:
    """Training handler: SHA-1 of the image and label of the first ``num_batches`` batches a trainer draws.

    Two runs with equal fingerprints trained on the same data, crops and augmentation, in the same order.
    """

    def __init__(self, num_batches: int = 3) -> None:
        self.num_batches = int(num_batches)
        self.digests: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self)  # the collated batch, before decollation

    def __call__(self, engine: Any) -> None:
        if len(self.digests) < self.num_batches:
            digest = hashlib.sha1()
            for key in ("image", "label"):
                value = engine.state.batch[key]
                digest.update(np.ascontiguousarray(torch.as_tensor(value).detach().cpu().numpy()).tobytes())
            self.digests.append(digest.hexdigest())


def check_models(models) -> list[str]:
    """The model names to train, validated: known names, no repeats, ``medsegdiff`` included."""
    names = model_names(models, MODELS)
    if "medsegdiff" not in names:
        raise ValueError("the models must include 'medsegdiff' (the bundle's default, the sampler comparison's model)")
    return names


def benchmark_parser(data_dir: str, datalist: str, model: str, seed: int, work_dir: str, overrides: dict[str, Any]):
    """The bundle's ``train.json`` with the demo recipe, ``overrides`` and the model's changes; held-out = testing."""
    _, model_overrides = MODELS[model]
    scratch = os.path.join(work_dir, "scratch", f"{model}_seed{seed}")
    parser = bundle_train_parser(
        BUNDLE,
        data_dir,
        datalist,
        {
            **demo_recipe(),
            "output_dir": scratch,
            "ckpt_dir": scratch,
            **overrides,
            **model_overrides,
            # the data order depends on the seed only, not on how much randomness the model's training draws
            "train#dataloader#generator": f"$torch.Generator().manual_seed({int(seed)})",
            "benchmark_fingerprint": {"_target_": "common.benchmarks.medsegdiff.BatchFingerprint"},
            "validate#datalist": "$load_datalist(@data_list_file_path, 'testing', @dataset_dir)",
        },
    )
    return parser


def make_scheduler(name: str, parser) -> Any:
    """The sampler ``"ddpm"``, ``"ddim"`` (the bundle's clipped DDIM) or ``"dpm_solver"`` on the training schedule."""
    from monai.networks.schedulers import DDPMScheduler

    from common.networks.clipped_ddim import ClippedDDIMScheduler
    from common.networks.dpm_solver import DPMSolverMultistepScheduler

    kwargs = {
        "num_train_timesteps": parser.get_parsed_content("num_train_timesteps"),
        "schedule": "linear_beta",
        "beta_start": parser.get_parsed_content("beta_start"),
        "beta_end": parser.get_parsed_content("beta_end"),
    }
    if name == "ddpm":
        return DDPMScheduler(**kwargs)
    if name == "ddim":
        return ClippedDDIMScheduler(**kwargs, clip_sample=True)
    if name == "dpm_solver":
        return DPMSolverMultistepScheduler(**kwargs, clip_sample=True)
    raise ValueError(f"unknown sampler {name!r}: use 'ddpm', 'ddim' or 'dpm_solver'")


def volume_dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice of two binary volumes (1.0 when both are empty)."""
    pred, label = np.asarray(pred) > 0.5, np.asarray(label) > 0.5
    total = pred.sum() + label.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, label).sum() / total)


@torch.no_grad()
def segment_volume(
    network: torch.nn.Module,
    volume: dict[str, Any],
    parser,
    kind: str,
    sampler: str = "ddim",
    steps: int = 10,
    ensemble: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[float, float]:
    """Segment one preprocessed held-out volume whole; return ``(Dice, seconds)`` (seconds: network and sampling).

    ``volume`` comes from the bundle's ``validate#preprocessing`` (image resized in-plane to the roi, label on the
    input grid). Diffusion (``kind="diffusion"``): the bundle's
    :class:`~common.engines.diffusion.DiffusionSegmentationInferer` with ``sampler``/``steps``/``ensemble``, fused by
    STAPLE when ``ensemble > 1``; deterministic: ``sigmoid(network(slice)) > 0.5`` per slice, slices and voxels
    without brain set to background as the inferer does. The mask is mapped back to the input grid with the
    bundle's ``Invertd`` (nearest) and compared with the label, averaged over mask channels.
    """
    from monai.transforms import Invertd
    from monai.utils import convert_to_dst_type

    from common.data.ensemble_fusion import FuseEnsembled
    from common.engines.diffusion import DiffusionSegmentationInferer

    device = next(network.parameters()).device
    image = volume["image"]
    plain = image.as_tensor()[None].to(device) if hasattr(image, "as_tensor") else image[None].to(device)
    channels = int(volume["label"].shape[0])
    start = time.perf_counter()
    if kind == "diffusion":
        inferer = DiffusionSegmentationInferer(
            make_scheduler(sampler, parser),
            num_inference_steps=steps,
            num_ensemble=ensemble,
            out_channels=channels,
            batch_size=batch_size,
            seed=seed,
        )
        samples = inferer(plain, network)[0].cpu()
        seconds = time.perf_counter() - start
        fused = FuseEnsembled("pred", ensemble, method="staple")({"pred": samples})["pred"] if ensemble > 1 else samples
    elif kind == "deterministic":
        slices = plain[0].movedim(-1, 0)  # (D, C, H, W)
        brain = slices.flatten(1).abs().amax(dim=1) > 0
        logits = torch.zeros(slices.shape[0], channels, *slices.shape[2:], device=device)
        todo = torch.nonzero(brain).flatten()
        for chunk in todo.split(batch_size):
            logits[chunk] = network(slices[chunk].float())
        masks = (torch.sigmoid(logits) > 0.5).float() * (slices.abs().amax(dim=1, keepdim=True) > 0)
        fused = masks.movedim(0, -1).cpu()
        seconds = time.perf_counter() - start
    else:
        raise ValueError(f"unknown kind {kind!r}: 'diffusion' or 'deterministic'")
    pred = convert_to_dst_type(fused, image)[0]
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(
        {"image": image, "pred": pred}
    )["pred"]
    label = np.asarray(volume["label"])
    mask = np.asarray(inverted.detach().cpu() if isinstance(inverted, torch.Tensor) else inverted)
    dice = float(np.mean([volume_dice(mask[c], label[c]) for c in range(channels)]))
    return dice, seconds


def _held_out(parser) -> list[dict[str, Any]]:
    """The held-out volumes through the bundle's validation preprocessing (cached by the parser's dataset)."""
    dataset = parser.get_parsed_content("validate#dataset")
    return [dataset[i] for i in range(len(dataset))]


def _evaluation(kind: str, steps: int, ensemble: int) -> dict[str, Any]:
    return {"sampler": "ddim", "steps": steps, "ensemble": ensemble} if kind == "diffusion" else {}


def train_run(
    model: str, seed: int, data: tuple[str, str], work_dir: str, settings: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """Train one model with one seed under the time budget; learning curve at ``curve_points``; keep EMA weights."""
    kind, _ = MODELS[model]
    parser = benchmark_parser(*data, model, seed, work_dir, settings["overrides"])
    volumes: list[dict[str, Any]] = []
    curve_eval = _evaluation(kind, 10, 1)

    def evaluate(parser_, trainer) -> dict[str, float]:
        network = parser_.get_parsed_content("ema_network")
        was_training = network.training
        network.eval()
        if not volumes:
            volumes.extend(_held_out(parser_))
        dice = [segment_volume(network, v, parser_, kind, seed=seed, **curve_eval)[0] for v in volumes]
        network.train(was_training)
        return {"dice_mean": float(np.mean(dice))}

    budget = float(settings["budget_s"])
    marks = [budget * (i + 1) / settings["curve_points"] for i in range(settings["curve_points"] - 1)]
    result = train_with_budget(
        parser,
        model=model,
        seed=seed,
        max_seconds=budget,
        max_steps=settings.get("max_steps"),
        checkpoint_seconds=marks,
        evaluate=evaluate,
        keep_handlers=["ema_handler", "benchmark_fingerprint"],
        progress=say,
    )
    result["kind"] = kind
    result["data_fingerprint"] = parser.get_parsed_content("benchmark_fingerprint").digests
    result["parameters"] = sum(p.numel() for p in parser.get_parsed_content("network").parameters())
    weights = os.path.join(work_dir, "runs", f"{model}_seed{seed}_ema.pt")
    with atomic_path(weights) as tmp:
        torch.save(parser.get_parsed_content("ema_network").state_dict(), tmp)
    result["weights"] = weights
    return result


def _trained_network(model: str, seed: int, data: tuple[str, str], work_dir: str, settings: dict[str, Any]):
    parser = benchmark_parser(*data, model, seed, work_dir, settings["overrides"])
    network = parser.get_parsed_content("network_def").to(settings["device"])
    state = torch.load(os.path.join(work_dir, "runs", f"{model}_seed{seed}_ema.pt"), map_location="cpu")
    network.load_state_dict(state)
    return parser, network.eval()


def final_evaluation(
    model: str, seed: int, data: tuple[str, str], work_dir: str, settings: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """Per-case whole-volume Dice of a trained run: diffusion at the headline setting and with 1 sample."""
    kind, _ = MODELS[model]
    parser, network = _trained_network(model, seed, data, work_dir, settings)
    volumes = _held_out(parser)
    sampler, steps, ensemble = HEADLINE
    settings_eval = (
        {"headline": {"sampler": sampler, "steps": steps, "ensemble": ensemble}, "single": _evaluation(kind, steps, 1)}
        if kind == "diffusion"
        else {"headline": {}}
    )
    out: dict[str, Any] = {
        "model": model,
        "seed": seed,
        "cases": [str(v.get("case", i)) for i, v in enumerate(volumes)],
    }
    for name, kwargs in settings_eval.items():
        dice, seconds = [], []
        for volume in volumes:
            d, s = segment_volume(network, volume, parser, kind, seed=seed, batch_size=settings["batch_size"], **kwargs)
            dice.append(d)
            seconds.append(s)
        out[name] = {"setting": kwargs, "dice": dice, "seconds": seconds, "dice_mean": float(np.mean(dice))}
        say(f"[{model} seed {seed}] {name} {kwargs or 'one pass'}: mean Dice {np.mean(dice):.4f}")
    return out


def sampler_comparison(
    seed: int, data: tuple[str, str], work_dir: str, settings: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """DDPM-1000 vs DDIM-10 vs DPM-Solver++-10 (1 sample) on the first ``ddpm_cases`` held-out whole volumes."""
    parser, network = _trained_network("medsegdiff", seed, data, work_dir, settings)
    volumes = _held_out(parser)[: settings["ddpm_cases"]]
    rows = {f"{name}-{steps}": {"sampler": name, "steps": steps, "dice": [], "seconds": []} for name, steps in SAMPLERS}
    for v, volume in enumerate(volumes):
        for name, steps in SAMPLERS:  # interleaved case by case: machine load affects every sampler alike
            d, s = segment_volume(
                network, volume, parser, "diffusion", name, steps, 1, settings["batch_size"], seed=seed
            )
            row = rows[f"{name}-{steps}"]
            row["dice"].append(d)
            row["seconds"].append(s)
            say(f"[samplers seed {seed}] case {v + 1}/{len(volumes)} {name}-{steps}: Dice {d:.4f}, {s:.1f} s")
    return {"seed": seed, "cases": [str(v.get("case", i)) for i, v in enumerate(volumes)], "rows": rows}


def prepare_data(
    work_dir: str, num_cases: int, num_test: int, shape: Sequence[int], seed: int, phantom: str
) -> tuple[str, str]:
    """Write the synthetic cases once (a ``.complete`` marker makes a rerun skip it); the datalist's ``testing``
    list holds ``num_test`` cases, ``training`` the rest. Returns ``(data_dir, datalist path)``."""
    from common.data.datalist import build_datalist, save_datalist
    from common.data.synthetic.write import write_synthetic_dataset

    if num_test < 1 or num_cases < num_test + 2:
        raise ValueError(f"num_cases ({num_cases}) must leave at least 2 training cases after num_test ({num_test}).")
    shape = [int(s) for s in shape]
    data_dir = os.path.join(work_dir, f"brats2021_{phantom}_{num_cases}x{'x'.join(map(str, shape))}_seed{seed}")
    if not os.path.isfile(os.path.join(data_dir, ".complete")):
        print(
            f"writing {num_cases} synthetic BraTS 2021 cases ({phantom} phantom) of {shape} to {data_dir}", flush=True
        )
        write_synthetic_dataset("brats2021", data_dir, num_cases=num_cases, shape=shape, seed=seed, phantom=phantom)
        with open(os.path.join(data_dir, ".complete"), "w") as f:
            f.write("complete\n")
    datalist = build_datalist(
        "brats2021", data_dir, seed=seed, val_fraction=0.0, test_fraction=num_test / num_cases, progress=False
    )
    if len(datalist["testing"]) != num_test:
        raise RuntimeError(f"the datalist holds {len(datalist['testing'])} test cases, not {num_test}")
    path = os.path.join(work_dir, "datalist.json")
    save_datalist(datalist, path)
    return data_dir, path


def run_benchmark(
    work_dir: str = "runs/benchmark_medsegdiff",
    num_cases: int = 24,
    num_test: int = 12,
    shape: Sequence[int] = (96, 96, 64),
    phantom: str = "realistic",
    models: Sequence[str] = tuple(MODELS),
    seeds: Sequence[int] = (0, 1, 2),
    budget_s: float = 360.0,
    curve_points: int = 4,
    ddpm_cases: int = 2,
    batch_size: int = 64,
    max_steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    threads: int | None = None,
    data_seed: int = 0,
) -> dict[str, Any]:
    """Run the whole protocol (module docstring); print progress; write ``benchmark_medsegdiff.{json,md}`` and the
    learning-curve PNG to ``work_dir``. Every finished piece is reused by a rerun with the same ``work_dir``.

    Args:
        work_dir: data, runs (one JSON per training run / evaluation / sampler comparison, EMA weights) and report.
        num_cases, num_test: synthetic cases written, and how many of them are held out.
        shape: volume size (x, y, z) of every case; the held-out whole volumes have ``z`` axial slices each.
        phantom: ``"realistic"`` or ``"basic"`` (:data:`common.data.synthetic.brain.BRAIN_PHANTOMS`).
        models: names of :data:`MODELS` (``medsegdiff`` must be one).
        seeds: training seeds (network initialisation, data order, noise).
        budget_s: training seconds per run (evaluations excluded).
        curve_points: learning-curve evaluations per run (evenly spaced in training time, the last at the end).
        ddpm_cases: held-out cases of the sampler comparison (DDPM-1000 costs 100 DDIM-10 runs each).
        batch_size: (slice, sample) pairs per network call when sampling.
        max_steps: optional step budget as well (for quick runs; ``None`` = the time budget alone).
        overrides: extra overrides of the bundle's train.json for every model (e.g. a smaller network for a test).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: PyTorch intra-op threads (``None``: PyTorch's default).
        data_seed: seed of the synthetic data and of the train/test split.
    """
    names = check_models(models)
    seeds = [int(s) for s in seeds]
    if curve_points < 1 or ddpm_cases < 1 or ddpm_cases > num_test or budget_s <= 0:
        raise ValueError("need curve_points >= 1, 1 <= ddpm_cases <= num_test and budget_s > 0")
    if threads is not None:
        torch.set_num_threads(int(threads))
    device_name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    work_dir = os.path.abspath(work_dir)
    os.makedirs(os.path.join(work_dir, "runs"), exist_ok=True)
    data = prepare_data(work_dir, num_cases, num_test, shape, data_seed, phantom)
    settings = {
        "budget_s": float(budget_s),
        "curve_points": int(curve_points),
        "ddpm_cases": int(ddpm_cases),
        "batch_size": int(batch_size),
        "max_steps": max_steps,
        "device": device_name,
        "overrides": {"device": f"$torch.device('{device_name}')", **(overrides or {})},
    }
    estimate = expected_minutes(len(names), len(seeds), budget_s, curve_points, num_test, ddpm_cases, int(shape[-1]))
    print(
        f"MedSegDiff benchmark: {len(names)} models x {len(seeds)} seeds x {budget_s:.0f} s; expected about "
        f"{estimate:.0f} min on 2 idle cores (see expected_minutes)",
        flush=True,
    )
    say = print
    runs, evaluations, samplers = {}, {}, {}
    for seed in seeds:
        for model in names:
            key, stem = f"{model}/{seed}", os.path.join(work_dir, "runs", f"{model}_seed{seed}")
            runs[key] = cached_run(
                stem + "_train.json", lambda m=model, s=seed: train_run(m, s, data, work_dir, settings, say)
            )
            evaluations[key] = cached_run(
                stem + "_eval.json", lambda m=model, s=seed: final_evaluation(m, s, data, work_dir, settings, say)
            )
        path = os.path.join(work_dir, "runs", f"samplers_seed{seed}.json")
        samplers[str(seed)] = cached_run(path, lambda s=seed: sampler_comparison(s, data, work_dir, settings, say))
    results = summarise(
        {
            "protocol": {
                "data": {
                    "layout": "brats2021",
                    "phantom": phantom,
                    "num_cases": num_cases,
                    "num_test": num_test,
                    "shape": list(map(int, shape)),
                    "data_seed": data_seed,
                    "synthetic": True,
                },
                "recipe": {**demo_recipe(), **(overrides or {})},
                "models": names,
                "seeds": seeds,
                "budget_s": float(budget_s),
                "headline": {"sampler": HEADLINE[0], "steps": HEADLINE[1], "ensemble": HEADLINE[2]},
                "samplers": [list(s) for s in SAMPLERS],
                "ddpm_cases": int(ddpm_cases),
                "device": device_name,
                "torch_threads": torch.get_num_threads(),
            },
            "runs": runs,
            "evaluations": evaluations,
            "samplers": samplers,
        }
    )
    plot_learning_curve(results, os.path.join(work_dir, "benchmark_medsegdiff_learning_curve.png"))
    write_report(work_dir, "benchmark_medsegdiff", results, format_report(results))
    return results


def expected_minutes(
    models: int,
    seeds: int,
    budget_s: float,
    curve_points: int,
    num_test: int,
    ddpm_cases: int,
    depth: int,
    seconds_per_slice_pass: float = 2.0e-3,
    seconds_per_volume_overhead: float = 0.7,
) -> float:
    """Rough wall time (minutes) of :func:`run_benchmark` on 2 idle cores.

    ``seconds_per_slice_pass``: one network pass on one slice of the demo network (roi 32, channels 16/32/64) in
    calls of 64 slices (about 3.4 ms of CPU time measured on one thread of a busy 2-core Xeon, so about 2 ms of wall
    time on 2 idle cores); ``seconds_per_volume_overhead``: STAPLE, inverse transforms and Dice per volume.
    """
    pass_s = seconds_per_slice_pass * depth  # one network pass over a whole volume
    per_volume = seconds_per_volume_overhead
    curve = curve_points * num_test * (10 * pass_s + per_volume)  # DDIM-10 x 1 per point (diffusion models)
    final = num_test * ((10 * 5 + 10) * pass_s + 2 * per_volume)  # DDIM-10 x 5 and x 1, per diffusion model
    samplers = ddpm_cases * ((1000 + 10 + 10) * pass_s + 3 * per_volume)
    diffusion_models = max(models - 1, 1)
    seconds = models * seeds * budget_s + seeds * (diffusion_models * (curve + final) + samplers)
    return seconds / 60.0


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of per-case values ``a - b``: mean, sd, 95 % t interval, wins of a, Wilcoxon p."""
    from scipy import stats

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = diff.size
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    p = float(stats.wilcoxon(diff).pvalue) if n > 1 and np.any(diff != 0) else 1.0
    mean = float(diff.mean())
    return {
        "n": int(n),
        "mean_diff": mean,
        "sd_diff": sd,
        "ci95": [mean - half, mean + half],
        "wins": int((diff > 0).sum()),
        "losses": int((diff < 0).sum()),
        "wilcoxon_p": p,
    }


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Add ``models`` (mean +- sd over seeds), ``paired`` (per-case comparisons), ``sampler_table``, ``targets``,
    ``fusion_decision``, ``data_identical`` and ``eval_metrics`` to the raw results."""
    protocol, runs, evaluations = results["protocol"], results["runs"], results["evaluations"]
    seeds, names = protocol["seeds"], protocol["models"]
    models: dict[str, Any] = {}
    for model in names:
        per_seed = [evaluations[f"{model}/{s}"]["headline"]["dice_mean"] for s in seeds]
        train = [runs[f"{model}/{s}"] for s in seeds]
        entry = {
            "kind": train[0]["kind"],
            "parameters": train[0]["parameters"],
            "dice": _mean_sd(per_seed),
            "dice_per_seed": per_seed,
            "steps": _mean_sd([r["steps"] for r in train]),
            "train_seconds": _mean_sd([r["train_seconds"] for r in train]),
            "steps_per_second": _mean_sd([r["steps"] / max(r["train_seconds"], 1e-9) for r in train]),
            "inference_seconds_per_volume": float(
                np.mean([np.mean(evaluations[f"{model}/{s}"]["headline"]["seconds"]) for s in seeds])
            ),
        }
        if "single" in evaluations[f"{model}/{seeds[0]}"]:
            entry["dice_single_sample"] = _mean_sd([evaluations[f"{model}/{s}"]["single"]["dice_mean"] for s in seeds])
        models[model] = entry

    def per_case(model: str) -> np.ndarray:  # each case's Dice averaged over seeds
        return np.mean([evaluations[f"{model}/{s}"]["headline"]["dice"] for s in seeds], axis=0)

    comparisons = {}
    for other in ("deterministic", "medsegdiff_residual_fusion"):
        if other in names:
            comparisons[f"medsegdiff - {other}"] = paired(per_case("medsegdiff"), per_case(other))

    rows: dict[str, Any] = {}
    for name, steps in SAMPLERS:
        key = f"{name}-{steps}"
        dice = [d for s in seeds for d in results["samplers"][str(s)]["rows"][key]["dice"]]
        seconds = [t for s in seeds for t in results["samplers"][str(s)]["rows"][key]["seconds"]]
        rows[key] = {
            "sampler": name,
            "steps": steps,
            "dice": _mean_sd(dice),
            "seconds_per_volume": float(np.mean(seconds)),
            "dice_all": dice,
            "seconds_all": seconds,
        }
    reference = rows[f"{SAMPLERS[0][0]}-{SAMPLERS[0][1]}"]
    for row in rows.values():
        row["speedup_vs_ddpm1000"] = float(np.sum(reference["seconds_all"]) / np.sum(row["seconds_all"]))
        row["paired_vs_ddpm1000"] = paired(row["dice_all"], reference["dice_all"])
    ddim = rows["ddim-10"]
    targets = {
        "ddim10_at_least_100x_faster_than_ddpm1000": ddim["speedup_vs_ddpm1000"] >= TARGET_SPEEDUP,
        "ddim10_within_0.01_dice_of_ddpm1000": ddim["paired_vs_ddpm1000"]["mean_diff"] >= -TARGET_DICE_GAP,
    }
    fusion = None
    if "medsegdiff_residual_fusion" in names:
        gap = models["medsegdiff_residual_fusion"]["dice"]["mean"] - models["medsegdiff"]["dice"]["mean"]
        fusion = {"residual_minus_paper": gap, "margin": FUSION_MARGIN, "residual_needed": gap > FUSION_MARGIN}
    fingerprints = {s: {m: runs[f"{m}/{s}"]["data_fingerprint"] for m in names} for s in seeds}
    identical = all(len({json.dumps(v) for v in fp.values()}) == 1 for fp in fingerprints.values())
    best = models["medsegdiff"]
    eval_metrics = {
        "synthetic_benchmark_mean_dice_WT_medsegdiff": round(best["dice"]["mean"], 4),
        "synthetic_benchmark_sd_dice_WT_medsegdiff": round(best["dice"]["sd"], 4),
        **(
            {
                "synthetic_benchmark_mean_dice_WT_deterministic_same_backbone": round(
                    models["deterministic"]["dice"]["mean"], 4
                )
            }
            if "deterministic" in models
            else {}
        ),
        "synthetic_benchmark_ddim10_speedup_vs_ddpm1000": round(ddim["speedup_vs_ddpm1000"], 1),
        "synthetic_benchmark_ddim10_minus_ddpm1000_dice": round(ddim["paired_vs_ddpm1000"]["mean_diff"], 4),
        "note": (
            f"SYNTHETIC data only ({protocol['data']['phantom']} phantom, {protocol['data']['num_test']} held-out "
            f"whole volumes of {'x'.join(map(str, protocol['data']['shape']))}, {len(seeds)} seeds, "
            f"{protocol['budget_s']:.0f} s CPU training per run, DDIM 10 x 5 + STAPLE; "
            "tools/benchmark_medsegdiff.py); not a BraTS result"
        ),
    }
    return {
        **results,
        "models": models,
        "paired": comparisons,
        "sampler_table": rows,
        "targets": targets,
        "fusion_decision": fusion,
        "data_identical_across_models": identical,
        "eval_metrics": eval_metrics,
    }


LABELS = {
    "medsegdiff": "MedSegDiff (paper fusion)",
    "medsegdiff_residual_fusion": "MedSegDiff (residual fusion)",
    "deterministic": "same backbone, deterministic",
}


def plot_learning_curve(results: dict[str, Any], path: str) -> str:
    """Held-out Dice against training seconds, one line per model (mean over seeds), band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for model in results["protocol"]["models"]:
        curves = [results["runs"][f"{model}/{s}"]["checkpoints"] for s in results["protocol"]["seeds"]]
        points = min(len(c) for c in curves)
        seconds = np.mean([[c[i]["seconds"] for i in range(points)] for c in curves], axis=0)
        dice = np.array([[c[i]["metrics"]["dice_mean"] for i in range(points)] for c in curves])
        ax.plot(seconds, dice.mean(axis=0), marker="o", label=LABELS.get(model, model))
        ax.fill_between(seconds, dice.min(axis=0), dice.max(axis=0), alpha=0.2)
    ax.set_xlabel("training time (s, evaluations excluded)")
    ax.set_ylabel("held-out whole-volume Dice (WT)")
    ax.set_title("MedSegDiff benchmark, synthetic data (diffusion: DDIM 10 x 1)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def format_report(results: dict[str, Any]) -> str:
    """The model card's benchmark section (Markdown), from a report JSON alone."""
    p = results["protocol"]
    data = p["data"]
    head = p["headline"]
    lines = [
        f"**Synthetic data** ({data['phantom']} phantom): {data['num_cases'] - data['num_test']} training and "
        f"{data['num_test']} held-out cases of {'x'.join(map(str, data['shape']))}; every model trained "
        f"{p['budget_s']:.0f} s per seed (evaluations excluded), seeds {p['seeds']}, device {p['device']} "
        f"({p['torch_threads']} threads); the demo recipe (roi {p['recipe'].get('roi_size')}, channels "
        f"{p['recipe'].get('network_def#channels')}, lr {p['recipe'].get('learning_rate')}). Dice per whole volume "
        f"(every slice), on the input grid; diffusion models sampled with {head['sampler'].upper()} "
        f"{head['steps']} steps x {head['ensemble']} samples fused by STAPLE. Same data, crops and order for every "
        f"model of a seed: {'verified' if results['data_identical_across_models'] else 'NOT verified'} "
        "(batch fingerprints).",
        "",
        "| model | parameters (M) | mean Dice (± sd over seeds) | per seed | 1 sample | steps in budget | steps/s | "
        "inference s/volume |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for model, m in results["models"].items():
        single = m.get("dice_single_sample")
        single_text = f"{single['mean']:.3f} ± {single['sd']:.3f}" if single else "one pass"
        per_seed = ", ".join(f"{d:.3f}" for d in m["dice_per_seed"])
        lines.append(
            f"| {LABELS.get(model, model)} | {m['parameters'] / 1e6:.2f} | {m['dice']['mean']:.3f} ± {m['dice']['sd']:.3f} "
            f"| {per_seed} | {single_text} | "
            f"{m['steps']['mean']:.0f} | {m['steps_per_second']['mean']:.2f} | {m['inference_seconds_per_volume']:.2f} |"
        )
    lines += [
        "",
        "Paired per-case comparison (each case's Dice averaged over seeds):",
        "",
        "| comparison | cases | mean difference | 95 % interval | wins / losses | Wilcoxon p |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, c in results["paired"].items():
        lines.append(
            f"| {name} | {c['n']} | {c['mean_diff']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
            f"{c['wins']} / {c['losses']} | {c['wilcoxon_p']:.3g} |"
        )
    lines += [
        "",
        f"Samplers on whole volumes (MedSegDiff, 1 sample, the first {p['ddpm_cases']} held-out cases x "
        f"{len(p['seeds'])} seeds, the same initial noise):",
        "",
        "| sampler | steps | mean Dice (± sd) | Dice - DDPM-1000 (paired) | s / volume | speed-up vs DDPM-1000 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {"ddpm": "DDPM", "ddim": "DDIM", "dpm_solver": "DPM-Solver++(2M)"}
    for row in results["sampler_table"].values():
        lines.append(
            f"| {names.get(row['sampler'], row['sampler'])} | {row['steps']} | {row['dice']['mean']:.3f} ± "
            f"{row['dice']['sd']:.3f} | {row['paired_vs_ddpm1000']['mean_diff']:+.4f} | {row['seconds_per_volume']:.2f} | "
            f"{row['speedup_vs_ddpm1000']:.1f}x |"
        )
    lines.append("")
    for target, ok in results["targets"].items():
        lines.append(f"- {target.replace('_', ' ')}: {'met' if ok else 'NOT met'}")
    fusion = results.get("fusion_decision")
    if fusion:
        lines.append(
            f"- fusion: residual form minus paper form = {fusion['residual_minus_paper']:+.4f} mean Dice; the residual "
            f"form is {'needed' if fusion['residual_needed'] else 'not needed'} (rule: more than "
            f"{fusion['margin']} better), so the bundle's default "
            f"{'should be fusion_residual=true' if fusion['residual_needed'] else 'stays the paper form (fusion_residual=false)'}."
        )
    lines += ["", "![learning curve](benchmark_learning_curve.png)"]
    return "\n".join(lines)


def update_model_card(report_path: str, bundle_dir: str = BUNDLE) -> dict[str, str]:
    """Write the report's section into the model card (between :data:`CARD_START` and :data:`CARD_END`), the
    learning curve to ``docs/benchmark_learning_curve.png`` and ``eval_metrics`` into ``configs/metadata.json``."""
    with open(report_path) as f:
        results = json.load(f)
    card = os.path.join(bundle_dir, "docs", "README.md")
    png = plot_learning_curve(results, os.path.join(bundle_dir, "docs", "benchmark_learning_curve.png"))
    with open(card) as f:
        text = f.read()
    if CARD_START not in text or CARD_END not in text:
        raise ValueError(f"{card}: no benchmark section markers ({CARD_START!r} ... {CARD_END!r})")
    section = f"{CARD_START}\n{format_report(results)}\n{CARD_END}"
    text = re.sub(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), lambda _m: section, text, flags=re.S)
    with atomic_path(card) as tmp, open(tmp, "w") as f:
        f.write(text)
    meta_path = os.path.join(bundle_dir, "configs", "metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["eval_metrics"] = results["eval_metrics"]
    with atomic_path(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=4)
        f.write("\n")
    return {"card": card, "png": png, "metadata": meta_path}
