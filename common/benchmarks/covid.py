"""The COVID-19 pipeline end to end on synthetic chest CT: GAN pseudo-masks, TransUNet, upper bound, HU baseline.

One run, from an empty folder (``tools/benchmark_covid.py``):

1. a synthetic dataset in the MosMedData layout (:func:`common.data.synthetic.write.write_synthetic_dataset`) and
   its datalist; every lesioned validation / testing study gets its synthetic true mask as ``label`` (the real
   release has masks for 50 CT-1 studies only; here every lesioned held-out study can be scored). Training
   studies get no label, and every training stage checks it (``validate_datalist_no_leak``);
2. the bundle's stages as a user runs them (``python -m monai.bundle run`` subprocesses, the sizes given here):
   ``train_gan`` -> ``pseudo_masks`` -> ``train`` (TransUNet on the pseudo-masks) -> ``inference`` on the testing
   studies;
3. the same TransUNet trained on the *true* masks of the training studies (same stages, ``pseudo_mask_dir``
   pointing at the true masks and their slice classes): the upper bound;
4. an HU-threshold baseline: lesion = lung & ``lo <= HU <= hi`` with the classical lung mask, the window chosen
   on the validation studies from :data:`HU_WINDOWS` (the best mean Dice), so the baseline is tuned on the same
   references the TransUNet's validation sees.

Reported, per method, on the lesioned testing studies on their own CT grid (:mod:`common.metrics.lesion`: counts
inside lung | lesion): Dice, sensitivity, specificity per volume (mean and std) and per slice; plus the Dice of
the pseudo-masks against the true masks of the lesioned training studies. The targets of the issue are checked
and reported as met or missed: the pseudo-mask TransUNet beats the threshold baseline, and reaches at least 80 %
of the upper bound's Dice. Every figure is measured in this run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose, Orientationd  # noqa: E402

from common.benchmarks.report import write_report  # noqa: E402
from common.bundle.pipeline import run_stage  # noqa: E402
from common.data.chest_ct import LungPreprocessd, lung_mask, nifti_to_zyx  # noqa: E402
from common.data.datalist import build_datalist, save_datalist, validate_datalist_no_leak  # noqa: E402
from common.data.pseudo_masks import PSEUDO_MASK_POSTFIX, save_slice_classes, slice_burden  # noqa: E402
from common.data.synthetic.write import write_synthetic_dataset  # noqa: E402
from common.data.writers import save_nifti  # noqa: E402
from common.engines.lesion_report import case_rows, write_lesion_report  # noqa: E402
from common.io import atomic_path  # noqa: E402
from common.metrics.lesion import METRIC_NAMES  # noqa: E402

__all__ = [
    "BUNDLE",
    "HU_WINDOWS",
    "METHODS",
    "add_true_labels",
    "check_targets",
    "format_report",
    "run_covid_benchmark",
    "threshold_lesions",
    "write_true_mask_dir",
]

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "covid_ct_gan_transunet_segmentation",
)
#: the rows of the report, in order
METHODS = ("transunet_pseudo", "transunet_true", "hu_threshold")
#: candidate (lo, hi) HU windows of the threshold baseline; the best on the validation studies is used
HU_WINDOWS: tuple[tuple[float, float], ...] = tuple(
    (lo, hi) for lo in (-800.0, -750.0, -700.0, -650.0, -600.0) for hi in (-300.0, -100.0, 100.0)
)
TRUE_MASK_DIR = "synthetic_truth"


def _load(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine, np.asarray(img.header.get_zooms()[:3])


def add_true_labels(datalist: Mapping[str, Any], dataset_dir: str) -> dict[str, Any]:
    """A copy of ``datalist`` where lesioned validation / testing studies have ``label`` = their synthetic true mask.

    Training items are left unchanged (no label); studies without a true mask (CT-0) keep none.
    """
    out = json.loads(json.dumps(dict(datalist)))
    for list_name in ("validation", "testing"):
        for item in out.get(list_name, []):
            truth = f"{TRUE_MASK_DIR}/{item['case']}_mask.nii.gz"
            if "label" not in item and os.path.isfile(os.path.join(dataset_dir, truth)):
                item["label"] = truth
    return out


def write_true_mask_dir(
    datalist: Mapping[str, Any], dataset_dir: str, out_dir: str, grid: Sequence[int], seed: int = 0
) -> str:
    """The true masks of the training studies laid out as a pseudo-mask folder (the upper bound's training targets).

    ``<out_dir>/<case>_pseudo.nii.gz`` (an empty mask for healthy studies, which have no true mask) and
    ``slice_classes.json`` from the true burdens on the preprocessing ``grid``, exactly as the pseudo-mask stage
    lays out its own. Returns ``out_dir``.
    """
    burdens = {}
    # the bundle's own preprocessing (orientation, then lung grid), so the slices are those the TransUNet sees
    pre = Compose(
        [Orientationd(["image", "label"], axcodes="RAS"), LungPreprocessd("image", grid=grid, label_keys="label")]
    )
    for item in datalist["training"]:
        image_path = os.path.join(dataset_dir, item["image"])
        ct, affine, _ = _load(image_path)
        truth_path = os.path.join(dataset_dir, TRUE_MASK_DIR, f"{item['case']}_mask.nii.gz")
        truth = _load(truth_path)[0] if os.path.isfile(truth_path) else np.zeros_like(ct)
        save_nifti(truth > 0, affine, os.path.join(out_dir, f"{item['case']}{PSEUDO_MASK_POSTFIX}.nii.gz"), np.uint8)
        data = pre(
            {
                "image": MetaTensor(ct[None], affine=affine, meta={"filename_or_obj": image_path}),
                "label": MetaTensor((truth > 0)[None].astype(np.float32), affine=affine),
            }
        )
        burdens[item["case"]] = slice_burden(data["label"][0].numpy(), data["lung"][0].numpy(), axis=0)
    save_slice_classes(os.path.join(out_dir, "slice_classes.json"), burdens, grid, seed)
    return out_dir


def threshold_lesions(ct_hu: np.ndarray, lung: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """The HU-threshold baseline: ``lung & (lo <= HU <= hi)``, any equal shapes, bool."""
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"the window needs hi > lo, got {window}")
    return np.asarray(lung, dtype=bool) & (ct_hu >= lo) & (ct_hu <= hi)


def _lung_xyz(ct_xyz: np.ndarray, zooms: np.ndarray, name: str) -> np.ndarray:
    ct_zyx, spacing = nifti_to_zyx(ct_xyz, zooms)
    return np.transpose(lung_mask(ct_zyx, spacing, name=name), (2, 1, 0))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    den = a.sum() + b.sum()
    return float(2 * (a & b).sum() / den) if den else float("nan")


def _score(
    items: Sequence[Mapping[str, Any]], dataset_dir: str, predict: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-volume and per-slice rows of ``predict(item, ct, lung) -> mask`` over the labelled ``items``."""
    volume_rows, slice_rows = [], []
    for item in items:
        ct, _, zooms = _load(os.path.join(dataset_dir, item["image"]))
        label = _load(os.path.join(dataset_dir, item["label"]))[0]
        lung = _lung_xyz(ct, zooms, item["image"])
        row, slices = case_rows(item["case"], predict(item, ct, lung), label, lung, slice_axis=2, spacing=zooms)
        volume_rows.append(row)
        slice_rows += slices
    return volume_rows, slice_rows


def _stage(name: str, config: list[str], run_id: str = "run") -> dict[str, Any]:
    return {"name": name, "config_file": config, "run_id": run_id}


def check_targets(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's targets from the per-method summaries (``mean_dice``): met or missed, with the ratio."""
    pseudo = results["transunet_pseudo"]["mean_dice"] or 0.0
    true = results["transunet_true"]["mean_dice"] or 0.0
    baseline = results["hu_threshold"]["mean_dice"] or 0.0
    ratio = pseudo / true if true > 0 else float("nan")
    return {
        "beats_threshold_baseline": bool(pseudo > baseline),
        "fraction_of_upper_bound": ratio,
        "reaches_80_percent_of_upper_bound": bool(ratio >= 0.8),
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Markdown tables of a :func:`run_covid_benchmark` report."""
    lines = [
        f"Synthetic MosMed-layout chest CT: {report['config']['num_cases']} studies of "
        f"{'x'.join(map(str, report['config']['shape']))} voxels, grid {'x'.join(map(str, report['config']['grid']))}"
        f", device {report['config']['device']}; {report['num_test_studies']} lesioned testing studies.",
        "",
        "| method | Dice (volume) | sensitivity | specificity | Dice (slice) |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {
        "transunet_pseudo": "TransUNet on GAN pseudo-masks",
        "transunet_true": "TransUNet on true masks (upper bound)",
        "hu_threshold": f"HU threshold {report['hu_window']} in the lung mask",
    }
    for method in METHODS:
        s = report["methods"][method]

        def fmt(m: str, s: Mapping[str, Any] = s) -> str:
            mean, std = s[f"mean_{m}"], s[f"std_{m}"]
            return "n/a" if mean is None else f"{mean:.3f} +- {std:.3f}"

        slice_dice = "n/a" if s["slice_mean_dice"] is None else f"{s['slice_mean_dice']:.3f}"
        lines.append(
            f"| {names[method]} | {fmt('dice')} | {fmt('sensitivity')} | {fmt('specificity')} | {slice_dice} |"
        )
    pm = report["pseudo_masks"]
    lines += [
        "",
        f"Pseudo-masks vs true masks, {pm['num_studies']} lesioned training studies: Dice {pm['mean_dice']:.3f} +- "
        f"{pm['std_dice']:.3f} (healthy training studies get empty masks by their category).",
        "",
        "| target | result |",
        "| --- | --- |",
        f"| TransUNet (pseudo) beats the HU threshold | {'met' if report['targets']['beats_threshold_baseline'] else 'MISSED'} |",
        f"| TransUNet (pseudo) >= 80 % of the upper bound's Dice | "
        f"{'met' if report['targets']['reaches_80_percent_of_upper_bound'] else 'MISSED'} "
        f"({100 * report['targets']['fraction_of_upper_bound']:.0f} %) |",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in report["seconds"].items()]
    return "\n".join(lines)


def _plot_methods(path: str, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colours = {"transunet_pseudo": "tab:red", "transunet_true": "tab:blue", "hu_threshold": "tab:gray"}
    for ax, metric in zip(axes, METRIC_NAMES):
        for method, method_rows in rows.items():
            pts = np.asarray([(r["lesion_fraction"], r[metric]) for r in method_rows], dtype=np.float64).reshape(-1, 2)
            pts = pts[np.isfinite(pts).all(axis=1)]
            ax.scatter(100 * pts[:, 0], pts[:, 1], s=30, alpha=0.8, color=colours[method], label=method)
        ax.set_xlabel("lesion fraction of the lung (%)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("per testing study (synthetic chest CT)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def run_covid_benchmark(
    work_dir: str,
    num_cases: int = 36,
    shape: Sequence[int] = (96, 96, 24),
    grid: Sequence[int] = (24, 64, 64),
    gan_epochs: int = 160,
    unet_epochs: int = 60,
    seed: int = 0,
    device: str = "cpu",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    gan_overrides: Mapping[str, Any] | None = None,
    unet_overrides: Mapping[str, Any] | None = None,
    echo: bool = False,
) -> dict[str, Any]:
    """Run the whole benchmark in ``work_dir`` (see the module docstring); return the report, also saved there.

    Args:
        work_dir: output folder (data, checkpoints, stage outputs and logs, ``report/``, ``covid_benchmark.json``
            and ``covid_benchmark.md``).
        num_cases: synthetic studies (split over CT-0..CT-4 as :func:`~common.data.synthetic.write.mosmed_category_counts`).
        shape: synthetic CT grid (x, y, z).
        grid: preprocessing grid (z, y, x) of the GAN and the TransUNet; y and x divisible by 16.
        gan_epochs, unet_epochs: training epochs of the GAN and of each TransUNet.
        seed: data and split seed.
        device: ``"cpu"`` or ``"cuda"``.
        val_fraction, test_fraction: datalist split.
        gan_overrides: config overrides of ``train_gan`` and ``pseudo_masks`` (e.g. network widths, learning rates).
        unet_overrides: config overrides of ``train`` and ``inference`` (e.g. TransUNet widths).
        echo: print the stages' logs.
    """
    work_dir = os.path.abspath(work_dir)
    grid = [int(g) for g in grid]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    dataset_dir = os.path.join(work_dir, "data")
    if os.path.isdir(dataset_dir):
        shutil.rmtree(dataset_dir)
    write_synthetic_dataset("mosmed", dataset_dir, num_cases=num_cases, shape=list(shape), seed=seed, progress=echo)
    datalist = build_datalist(
        "mosmed", dataset_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, progress=False
    )
    datalist = add_true_labels(datalist, dataset_dir)
    validate_datalist_no_leak(datalist, dataset_dir)
    datalist_path = os.path.join(work_dir, "datalist.json")
    save_datalist(datalist, datalist_path)
    seconds["data"] = time.perf_counter() - start

    gan = {"roi_size": grid, "num_workers": 0, **dict(gan_overrides or {})}
    unet = {"num_workers": 0, **dict(unet_overrides or {})}
    common = {"dataset_dir": dataset_dir, "data_list_file_path": datalist_path, "device": device}

    def stage(name: str, config: list[str], overrides: dict[str, Any], run_id: str = "run", key: str = "") -> None:
        t0 = time.perf_counter()
        spec = _stage(name, config, run_id)
        out = {**common, "output_dir": os.path.join(work_dir, key or name), **overrides}
        run_stage(BUNDLE, spec, out, os.path.join(work_dir, "logs", f"{key or name}.log"), echo=echo)
        seconds[key or name] = time.perf_counter() - t0

    ckpt = os.path.join(work_dir, "checkpoints")
    ckpt_true = os.path.join(work_dir, "checkpoints_true")
    # the pseudo-mask stage builds the same generator; the other GAN settings are the training stage's only
    shared = ("network_def", "roi_size", "num_workers", "hu_window")
    generator = {k: v for k, v in gan.items() if k.startswith(shared)}
    pseudo = {k: v for k, v in gan.items() if k.startswith(shared) or k == "pseudo_mask_threshold"}
    gan_train = {k: v for k, v in gan.items() if k != "pseudo_mask_threshold"}
    stage("train_gan", ["configs/train_gan.json"], {**gan_train, "ckpt_dir": ckpt, "epochs": gan_epochs}, "training")
    stage("pseudo_masks", ["configs/pseudo_masks.json"], {**generator, **pseudo, "ckpt_dir": ckpt})
    stage(
        "train", ["configs/train.json"], {**unet, "ckpt_dir": ckpt, "epochs": unet_epochs}, "training", "train_pseudo"
    )
    infer = {k: v for k, v in unet.items() if k.startswith("network_def") or k == "sw_batch_size"}
    infer["roi_size"] = grid
    stage(
        "inference",
        ["configs/inference.json"],
        {**infer, "ckpt_path": os.path.join(ckpt, "model.pt")},
        key="inference_pseudo",
    )

    t0 = time.perf_counter()
    true_dir = write_true_mask_dir(datalist, dataset_dir, os.path.join(ckpt_true, "pseudo_masks"), grid, seed)
    seconds["true_masks"] = time.perf_counter() - t0
    stage(
        "train",
        ["configs/train.json"],
        {**unet, "ckpt_dir": ckpt_true, "pseudo_mask_dir": true_dir, "epochs": unet_epochs},
        "training",
        "train_true",
    )
    stage(
        "inference",
        ["configs/inference.json"],
        {**infer, "ckpt_path": os.path.join(ckpt_true, "model.pt")},
        key="inference_true",
    )

    t0 = time.perf_counter()
    test_items = [it for it in datalist["testing"] if "label" in it]
    val_items = [it for it in datalist["validation"] if "label" in it]
    best_window, best_dice = HU_WINDOWS[0], -1.0
    for window in HU_WINDOWS:
        rows, _ = _score(val_items, dataset_dir, lambda item, ct, lung, w=window: threshold_lesions(ct, lung, w))
        mean = float(np.nanmean([r["dice"] for r in rows]))
        if mean > best_dice:
            best_window, best_dice = window, mean

    def from_dir(folder: str):
        return lambda item, ct, lung: _load(os.path.join(work_dir, folder, f"{item['case']}_seg.nii.gz"))[0]

    predictors = {
        "transunet_pseudo": from_dir("inference_pseudo"),
        "transunet_true": from_dir("inference_true"),
        "hu_threshold": lambda item, ct, lung: threshold_lesions(ct, lung, best_window),
    }
    methods, all_rows = {}, {}
    for method, predict in predictors.items():
        volume_rows, slice_rows = _score(test_items, dataset_dir, predict)
        all_rows[method] = volume_rows
        methods[method] = write_lesion_report(
            volume_rows, slice_rows, os.path.join(work_dir, "report", method), title=method
        )
    pseudo_dice = []
    for item in datalist["training"]:
        truth = os.path.join(dataset_dir, TRUE_MASK_DIR, f"{item['case']}_mask.nii.gz")
        if os.path.isfile(truth):
            pm = _load(os.path.join(ckpt, "pseudo_masks", f"{item['case']}{PSEUDO_MASK_POSTFIX}.nii.gz"))[0]
            pseudo_dice.append(_dice(pm, _load(truth)[0]))
    seconds["scoring"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    _plot_methods(os.path.join(work_dir, "report", "methods_vs_lesion_fraction.png"), all_rows)

    report = {
        "config": {
            "num_cases": num_cases,
            "shape": list(shape),
            "grid": grid,
            "gan_epochs": gan_epochs,
            "unet_epochs": unet_epochs,
            "seed": seed,
            "device": device,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "gan_overrides": gan,
            "unet_overrides": unet,
        },
        "num_train_studies": len(datalist["training"]),
        "num_test_studies": len(test_items),
        "hu_window": list(best_window),
        "hu_window_validation_dice": best_dice,
        "methods": methods,
        "pseudo_masks": {
            "num_studies": len(pseudo_dice),
            "mean_dice": float(np.nanmean(pseudo_dice)) if pseudo_dice else float("nan"),
            "std_dice": float(np.nanstd(pseudo_dice)) if pseudo_dice else float("nan"),
        },
        "seconds": seconds,
    }
    report["targets"] = check_targets(methods)
    write_report(work_dir, "covid_benchmark", report, format_report(report))
    return report
