"""The COVID-19 pipeline on synthetic chest CT: are GAN pseudo-masks better training labels than an HU window?

One run (``tools/benchmark_covid.py``), in-process, every training through the bundle's own configs and the shared
budget trainer (:func:`common.benchmarks.budget.train_with_budget`, epoch budgets, so results do not depend on the
machine's load), resumable per run (:func:`common.benchmarks.budget.cached_run`). For each phantom of
:data:`PHANTOMS` (the plain synthetic CT, whose lesions are defined by an HU range, and a ``realistic`` one where
the HU of disease and normal structures overlap, see :mod:`common.data.synthetic.chest_ct`):

1. a synthetic dataset in the MosMedData layout and its datalist; every lesioned validation / testing study gets
   its synthetic true mask as ``label`` (the real release has masks for 50 CT-1 studies only). Training studies
   get no label, and this is checked (``validate_datalist_no_leak``);
2. three sets of training labels for the training studies, each laid out as the pseudo-mask stage lays out its
   own (``<case>_pseudo.nii.gz`` on the CT grid and ``slice_classes.json`` for the contrastive phase):

   - ``gan``: the method's. The 3D GAN (``train_gan.json``, ``gan_epochs``) and the pseudo-mask stage
     (``pseudo_masks.json``), once per seed;
   - ``hu``: the obvious unsupervised alternative. ``lung & lo <= HU <= hi`` with the bundle's lung mask, ``lo``
     Otsu's threshold of the lung HU of the COVID-19 training studies and ``hi`` +100 HU
     (:func:`common.data.pseudo_masks.otsu_lung_window`): no reference mask is used. Healthy (CT-0) studies get
     empty masks, as the GAN stage gives them;
   - ``true``: the synthetic truth, the upper bound;

3. the same TransUNet (``train.json``, the same phases, ``unet_epochs``) trained on each, once per seed and per
   model selection of :data:`common.engines.contrastive_segmentation.MODEL_SELECTIONS`: ``validation`` (the
   config's default: the reference masks of the validation studies drive ReduceLROnPlateau and pick the best
   epoch) and ``final`` (no reference mask at all: fixed learning rate, last epoch), then the bundle's
   ``inference.json`` on the testing studies;
4. the raw rules, without training: the HU window of the ``hu`` labels applied to the testing studies, and, for
   reference, the window a user with the validation masks would pick (the best of :data:`HU_WINDOWS`).

Scores on every lesioned testing study, on its own CT grid (:func:`common.engines.lesion_report.case_rows`:
counts inside lung | lesion): Dice, sensitivity, specificity per volume; reported as the mean over seeds of the
per-seed mean over studies, +- the sd over seeds. Also the Dice of the ``gan`` and ``hu`` labels against the
truth on the lesioned training studies. Targets (issue 15 B), per phantom and model selection: the GAN-labelled
TransUNet's Dice >= the HU-labelled one's, and >= 90 % of the upper bound's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose, Orientationd  # noqa: E402

from common.benchmarks.budget import cached_run, train_with_budget  # noqa: E402
from common.benchmarks.report import bundle_train_parser, write_report  # noqa: E402
from common.data.chest_ct import LungPreprocessd, lung_mask, nifti_to_zyx  # noqa: E402
from common.data.datalist import build_datalist, save_datalist, validate_datalist_no_leak  # noqa: E402
from common.data.mosmed import HEALTHY_CATEGORIES  # noqa: E402
from common.data.pseudo_masks import (  # noqa: E402
    PSEUDO_MASK_POSTFIX,
    hu_window_mask,
    otsu_lung_window,
    save_slice_classes,
    slice_burden,
)
from common.data.synthetic.write import write_synthetic_dataset  # noqa: E402
from common.data.writers import save_nifti  # noqa: E402
from common.engines.checkpoint import save_checkpoint  # noqa: E402
from common.engines.contrastive_segmentation import MODEL_SELECTIONS  # noqa: E402
from common.engines.lesion_report import case_rows  # noqa: E402
from common.io import atomic_path  # noqa: E402
from common.metrics.lesion import METRIC_NAMES  # noqa: E402

__all__ = [
    "BUNDLE",
    "HU_WINDOWS",
    "LABELS",
    "PHANTOMS",
    "add_true_labels",
    "check_targets",
    "format_report",
    "run_covid_benchmark",
    "summarize_runs",
    "write_label_dir",
]

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "covid_ct_gan_transunet_segmentation",
)
#: the synthetic CT variants, as options of :func:`common.data.synthetic.chest_ct.make_chest_ct_case`
PHANTOMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "realistic": {"pleural_lesions": True, "hu_overlap": True},
}
#: the training labels compared, in report order
LABELS = ("gan", "hu", "true")
LABEL_NAMES = {"gan": "GAN pseudo-masks", "hu": "HU-window pseudo-masks", "true": "true masks (upper bound)"}
#: candidate (lo, hi) HU windows of the reference rule tuned on the validation masks
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


def _truth(dataset_dir: str, case: str) -> np.ndarray | None:
    path = os.path.join(dataset_dir, TRUE_MASK_DIR, f"{case}_mask.nii.gz")
    return _load(path)[0] > 0 if os.path.isfile(path) else None


def _lung_xyz(ct_xyz: np.ndarray, zooms: np.ndarray, name: str) -> np.ndarray:
    """The bundle's lung mask of a CT stored ``(X, Y, Z)``, in that order."""
    ct_zyx, spacing = nifti_to_zyx(ct_xyz, zooms)
    return np.transpose(lung_mask(ct_zyx, spacing, name=name), (2, 1, 0))


def write_label_dir(
    datalist: Mapping[str, Any],
    dataset_dir: str,
    out_dir: str,
    grid: Sequence[int],
    label_of: Callable[[Mapping[str, Any], np.ndarray, np.ndarray, np.ndarray], np.ndarray | None],
    seed: int = 0,
) -> str:
    """Training labels laid out as the pseudo-mask stage lays out its own; returns ``out_dir``.

    ``<out_dir>/<case>_pseudo.nii.gz`` on each training study's CT grid (``label_of(item, ct, affine, zooms)``, an
    ``(X, Y, Z)`` mask, or ``None`` for an empty one) and ``slice_classes.json`` from the labels' burdens on the
    preprocessing ``grid``, computed through the bundle's own preprocessing (orientation, lung grid), so the
    slices and classes are those the TransUNet sees.
    """
    burdens = {}
    pre = Compose(
        [Orientationd(["image", "label"], axcodes="RAS"), LungPreprocessd("image", grid=grid, label_keys="label")]
    )
    for item in datalist["training"]:
        image_path = os.path.join(dataset_dir, item["image"])
        ct, affine, zooms = _load(image_path)
        label = label_of(item, ct, affine, zooms)
        label = np.zeros(ct.shape, dtype=bool) if label is None else np.asarray(label, dtype=bool)
        save_nifti(label, affine, os.path.join(out_dir, f"{item['case']}{PSEUDO_MASK_POSTFIX}.nii.gz"), np.uint8)
        data = pre(
            {
                "image": MetaTensor(ct[None], affine=affine, meta={"filename_or_obj": image_path}),
                "label": MetaTensor(label[None].astype(np.float32), affine=affine),
            }
        )
        burdens[item["case"]] = slice_burden(data["label"][0].numpy(), data["lung"][0].numpy(), axis=0)
    save_slice_classes(os.path.join(out_dir, "slice_classes.json"), burdens, grid, seed)
    return out_dir


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    den = a.sum() + b.sum()
    return float(2 * (a & b).sum() / den) if den else float("nan")


def _label_dice(datalist: Mapping[str, Any], dataset_dir: str, label_dir: str) -> list[float]:
    """Dice of the labels in ``label_dir`` against the truth, per lesioned training study."""
    out = []
    for item in datalist["training"]:
        truth = _truth(dataset_dir, item["case"])
        if truth is not None:
            out.append(_dice(_load(os.path.join(label_dir, f"{item['case']}{PSEUDO_MASK_POSTFIX}.nii.gz"))[0], truth))
    return out


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else None, "std": float(arr.std()) if arr.size else None}


class _Study:
    """A testing study with its CT, truth and (cached) lung mask on the CT grid."""

    def __init__(self, item: Mapping[str, Any], dataset_dir: str) -> None:
        self.item = dict(item)
        self.ct, self.affine, self.zooms = _load(os.path.join(dataset_dir, item["image"]))
        self.label = _load(os.path.join(dataset_dir, item["label"]))[0] > 0
        self.lung = _lung_xyz(self.ct, self.zooms, item["image"])


def _score(studies: Sequence[_Study], predict: Callable[[_Study], np.ndarray]) -> list[dict[str, Any]]:
    """Per-volume rows of ``predict(study) -> mask`` (CT grid), as :func:`case_rows` computes them."""
    return [case_rows(s.item["case"], predict(s), s.label, s.lung, slice_axis=2, spacing=s.zooms)[0] for s in studies]


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    return {m: _stats([r[m] for r in rows])["mean"] for m in METRIC_NAMES}


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sd over the runs (seeds) of each run's mean Dice / sensitivity / specificity over its studies."""
    out: dict[str, Any] = {"num_runs": len(runs)}
    for metric in METRIC_NAMES:
        stats = _stats([r["means"][metric] for r in runs])
        out[f"mean_{metric}"], out[f"std_{metric}"] = stats["mean"], stats["std"]
    for key in ("label_dice", "train_seconds", "steps"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            stats = _stats(values)
            out[f"mean_{key}"], out[f"std_{key}"] = stats["mean"], stats["std"]
    return out


def check_targets(methods: Mapping[str, Mapping[str, Any]], selection: str) -> dict[str, Any]:
    """Issue 15 B's targets for one model selection, from :func:`summarize_runs` summaries keyed
    ``transunet_<label>_<selection>``: the GAN-labelled TransUNet's mean Dice >= the HU-labelled one's, and >= 90 %
    of the upper bound's."""
    gan, hu, true = (methods[f"transunet_{label}_{selection}"]["mean_dice"] or 0.0 for label in LABELS)
    ratio = gan / true if true > 0 else float("nan")
    return {"gan_at_least_hu": bool(gan >= hu), "fraction_of_upper_bound": ratio, "at_least_90_percent": ratio >= 0.9}


def _fmt(s: Mapping[str, Any], key: str) -> str:
    mean, std = s.get(f"mean_{key}"), s.get(f"std_{key}")
    return "n/a" if mean is None else f"{mean:.3f} +- {std:.3f}"


def format_report(report: Mapping[str, Any]) -> str:
    """Markdown tables of a :func:`run_covid_benchmark` report, one block per phantom."""
    cfg = report["config"]
    lines = [
        f"Synthetic MosMed-layout chest CT, {cfg['num_cases']} studies of {'x'.join(map(str, cfg['shape']))} voxels "
        f"per phantom, grid {'x'.join(map(str, cfg['grid']))}, seeds {cfg['seeds']}, GAN {cfg['gan_epochs']} "
        f"epochs, TransUNet {cfg['unet_epochs']} epochs, device {cfg['device']}, torch threads {cfg['threads']}. "
        "TransUNet rows: mean +- sd over seeds of the per-seed mean over the testing studies.",
    ]
    for phantom, block in report["phantoms"].items():
        lines += [
            "",
            f"### Phantom `{phantom}` ({block['num_test_studies']} lesioned testing studies, "
            f"{block['num_train_lesioned']} lesioned training studies)",
            "",
            "| method | labels vs truth (Dice) | Dice | sensitivity | specificity | training s |",
            "| --- | --- | --- | --- | --- | ---: |",
        ]
        for selection in cfg["selections"]:
            for label in LABELS:
                s = block["methods"][f"transunet_{label}_{selection}"]
                label_dice = _fmt(s, "label_dice") if label != "true" else "1"
                seconds = s.get("mean_train_seconds")
                lines.append(
                    f"| TransUNet on {LABEL_NAMES[label]}, selection `{selection}` | {label_dice} | {_fmt(s, 'dice')} "
                    f"| {_fmt(s, 'sensitivity')} | {_fmt(s, 'specificity')} | {seconds or 0:.0f} |"
                )
        for name, title in (
            ("hu_rule", f"HU window {block['hu_window']} itself (no masks)"),
            ("hu_rule_tuned", f"HU window {block['hu_window_tuned']} tuned on the validation masks"),
        ):
            s = block["methods"][name]
            lines.append(f"| {title} | | {_fmt(s, 'dice')} | {_fmt(s, 'sensitivity')} | {_fmt(s, 'specificity')} | |")
        lines += ["", "| target | selection | result |", "| --- | --- | --- |"]
        for selection, t in block["targets"].items():
            lines.append(
                f"| GAN-labelled TransUNet >= HU-labelled | `{selection}` | {'met' if t['gan_at_least_hu'] else 'MISSED'} |"
            )
            lines.append(
                f"| GAN-labelled TransUNet >= 90 % of the upper bound | `{selection}` | "
                f"{'met' if t['at_least_90_percent'] else 'MISSED'} ({100 * t['fraction_of_upper_bound']:.0f} %) |"
            )
    seconds = report["seconds"]
    lines += [
        "",
        f"Run time of this invocation: {seconds['total']:.0f} s; training and inference of all its runs (reused ones "
        f"included, as they took it): {seconds['all_runs']:.0f} s.",
    ]
    return "\n".join(lines)


def _plot(path: str, rows: Mapping[str, Sequence[Mapping[str, Any]]], title: str) -> None:
    """Per-study metrics against the lesion fraction of the lung, one colour per method."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colours = dict(zip(rows, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, metric in zip(axes, METRIC_NAMES):
        for method, method_rows in rows.items():
            pts = np.asarray([(r["lesion_fraction"], r[metric]) for r in method_rows], dtype=np.float64).reshape(-1, 2)
            pts = pts[np.isfinite(pts).all(axis=1)]
            ax.scatter(100 * pts[:, 0], pts[:, 1], s=18, alpha=0.7, color=colours[method], label=method)
        ax.set_xlabel("lesion fraction of the lung (%)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _parser(config: str, overrides: Mapping[str, Any]) -> Any:
    """ConfigParser of one of the bundle's configs with ``overrides`` applied (``bundle_root`` set)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", config))
    parser.update({"bundle_root": BUNDLE, "num_workers": 0, **overrides})
    return parser


@dataclass
class _Setup:
    """The settings every run of one benchmark shares."""

    seeds: Sequence[int]
    selections: Sequence[str]
    num_cases: int
    shape: Sequence[int]
    grid: list[int]
    gan_epochs: int
    unet_epochs: int
    device: str
    data_seed: int
    val_fraction: float
    test_fraction: float
    gan: dict[str, Any]
    unet: dict[str, Any]
    say: Callable[[str], None]

    @property
    def gan_train(self) -> dict[str, Any]:
        return {k: v for k, v in self.gan.items() if k != "pseudo_mask_threshold"}

    @property
    def pseudo_stage(self) -> dict[str, Any]:
        """The pseudo-mask stage builds the same generator; the other GAN settings are the training stage's only."""
        keys = ("network_def", "roi_size", "hu_window", "pseudo_mask_threshold")
        return {k: v for k, v in self.gan.items() if k.startswith(keys)}

    @property
    def inference(self) -> dict[str, Any]:
        return {k: v for k, v in self.unet.items() if k.startswith("network_def") or k == "sw_batch_size"}


class _Phantom:
    """One phantom's folder, data and studies (the testing studies loaded once, when first scored)."""

    def __init__(self, name: str, work_dir: str, setup: _Setup) -> None:
        self.name = name
        self.root = os.path.join(work_dir, name)
        self.dataset_dir = os.path.join(self.root, "data")
        self.datalist_path = os.path.join(self.root, "datalist.json")
        self.paths = {
            "dataset_dir": self.dataset_dir,
            "data_list_file_path": self.datalist_path,
            "device": setup.device,
        }
        self._studies: list[_Study] | None = None
        self.datalist: dict[str, Any] = {}

    def load(self) -> None:
        with open(self.datalist_path) as f:
            self.datalist = json.load(f)

    def items(self, list_name: str, labelled: bool | None = None) -> list[dict[str, Any]]:
        if labelled is None:
            return list(self.datalist[list_name])
        return [it for it in self.datalist[list_name] if ("label" in it) == labelled]

    @property
    def studies(self) -> list[_Study]:
        if self._studies is None:
            self._studies = [_Study(it, self.dataset_dir) for it in self.items("testing", labelled=True)]
        return self._studies


def _make_data(setup: _Setup, ph: _Phantom) -> dict[str, Any]:
    setup.say(f"[{ph.name}] writing {setup.num_cases} synthetic studies")
    t0 = time.perf_counter()
    if os.path.isdir(ph.dataset_dir):  # a killed write: start again
        shutil.rmtree(ph.dataset_dir)
    write_synthetic_dataset(
        "mosmed", ph.dataset_dir, setup.num_cases, list(setup.shape), setup.data_seed, False, **PHANTOMS[ph.name]
    )
    datalist = build_datalist(
        "mosmed",
        ph.dataset_dir,
        seed=setup.data_seed,
        val_fraction=setup.val_fraction,
        test_fraction=setup.test_fraction,
        progress=False,
    )
    datalist = add_true_labels(datalist, ph.dataset_dir)
    validate_datalist_no_leak(datalist, ph.dataset_dir)
    save_datalist(datalist, ph.datalist_path)
    return {"datalist": ph.datalist_path, "seconds": time.perf_counter() - t0}


def _true_labels(setup: _Setup, ph: _Phantom) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = write_label_dir(
        ph.datalist,
        ph.dataset_dir,
        os.path.join(ph.root, "labels_true"),
        setup.grid,
        lambda item, ct, affine, zooms: _truth(ph.dataset_dir, item["case"]),
    )
    return {"label_dir": out, "seconds": time.perf_counter() - t0}


def _hu_labels(setup: _Setup, ph: _Phantom) -> dict[str, Any]:
    t0 = time.perf_counter()
    lungs_hu = []
    for item in ph.items("training"):  # the window is found on the unmasked COVID-19 studies: no reference mask
        if item["category"] not in HEALTHY_CATEGORIES:
            ct, _, zooms = _load(os.path.join(ph.dataset_dir, item["image"]))
            lungs_hu.append(ct[_lung_xyz(ct, zooms, item["image"])])
    window = otsu_lung_window(lungs_hu)
    setup.say(f"[{ph.name}] HU-window labels: Otsu window {window[0]:.0f} .. {window[1]:.0f} HU")

    def label_of(item: Mapping[str, Any], ct: np.ndarray, affine: np.ndarray, zooms: np.ndarray) -> np.ndarray | None:
        if item["category"] in HEALTHY_CATEGORIES:  # as the GAN stage: normal by their category
            return None
        return hu_window_mask(ct, _lung_xyz(ct, zooms, item["image"]), window)

    out = write_label_dir(ph.datalist, ph.dataset_dir, os.path.join(ph.root, "labels_hu"), setup.grid, label_of)
    dice = _label_dice(ph.datalist, ph.dataset_dir, out)
    return {"label_dir": out, "window": list(window), "label_dice": dice, "seconds": time.perf_counter() - t0}


def _rules(setup: _Setup, ph: _Phantom, window: Sequence[float]) -> dict[str, Any]:
    """The HU rules scored on the testing studies: ``window`` (mask-free), and the best of :data:`HU_WINDOWS` on the
    validation studies' masks (what a user with masks would pick)."""
    t0 = time.perf_counter()
    validation = [_Study(it, ph.dataset_dir) for it in ph.items("validation", labelled=True)]

    def rule(w: Sequence[float]) -> Callable[[_Study], np.ndarray]:
        return lambda study: hu_window_mask(study.ct, study.lung, w)

    tuned = max(HU_WINDOWS, key=lambda w: np.nanmean([r["dice"] for r in _score(validation, rule(w))]))
    out: dict[str, Any] = {}
    for name, w in (("hu_rule", window), ("hu_rule_tuned", tuned)):
        rows = _score(ph.studies, rule(w))
        out[name] = {"window": list(w), "rows": rows, "means": _means(rows)}
    out["seconds"] = time.perf_counter() - t0
    return out


def _gan_labels(setup: _Setup, ph: _Phantom, seed: int) -> dict[str, Any]:
    """Train the GAN (``train_gan.json``) under its epoch budget, then run the pseudo-mask stage with it."""
    gan_dir = os.path.join(ph.root, f"seed{seed}", "gan")
    overrides = {**setup.gan_train, **ph.paths, "ckpt_dir": gan_dir, "output_dir": gan_dir, "seed": seed}
    parser = bundle_train_parser(BUNDLE, ph.dataset_dir, ph.datalist_path, overrides, config="train_gan.json")
    result = train_with_budget(
        parser, model=f"{ph.name} GAN", seed=seed, max_epochs=setup.gan_epochs, progress=setup.say
    )
    save_checkpoint(parser.get_parsed_content("network").state_dict(), os.path.join(gan_dir, "generator.pt"))
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the generator's bottleneck noise
    stage = _parser("pseudo_masks.json", {**setup.pseudo_stage, **ph.paths, "ckpt_dir": gan_dir, "seed": seed})
    stage.get_parsed_content("evaluator").run()
    label_dir = os.path.join(gan_dir, "pseudo_masks")
    dice = _label_dice(ph.datalist, ph.dataset_dir, label_dir)
    return {**result, "label_dir": label_dir, "label_dice": dice, "pseudo_seconds": time.perf_counter() - t0}


def _transunet(
    setup: _Setup, ph: _Phantom, seed: int, label: str, selection: str, labels: Mapping[str, Any]
) -> dict[str, Any]:
    """Train the TransUNet (``train.json``) on ``labels`` under its epoch budget, run ``inference.json``, score."""
    name = f"transunet_{label}_{selection}"
    run_dir = os.path.join(ph.root, f"seed{seed}", name)
    overrides = {
        **setup.unet,
        **ph.paths,
        "pseudo_mask_dir": labels["label_dir"],
        "ckpt_dir": run_dir,
        "output_dir": run_dir,
        "seed": seed,
        "model_selection": selection,
    }
    parser = bundle_train_parser(BUNDLE, ph.dataset_dir, ph.datalist_path, overrides)
    # "validation" keeps the config's ValidationHandler (ReduceLROnPlateau and the best model on the validation
    # masks); "final" drops it, as model_selection="final" does in the config: fixed learning rate, last epoch
    handlers = parser["train"]["handlers"]
    validation = [f"train#handlers#{i}" for i, h in enumerate(handlers) if h["_target_"] == "ValidationHandler"]
    keep = validation if selection == "validation" else []
    result = train_with_budget(
        parser,
        model=f"{ph.name} {name}",
        seed=seed,
        max_epochs=setup.unet_epochs,
        keep_handlers=keep,
        progress=setup.say,
    )
    weights = os.path.join(run_dir, "model.pt")
    if selection == "final" or not os.path.isfile(weights):
        save_checkpoint(parser.get_parsed_content("network").state_dict(), weights)
    t0 = time.perf_counter()
    pred_dir = os.path.join(run_dir, "pred")
    inference = {**setup.inference, **ph.paths, "roi_size": setup.grid, "ckpt_path": weights, "output_dir": pred_dir}
    _parser("inference.json", inference).get_parsed_content("evaluator").run()
    rows = _score(ph.studies, lambda study: _load(os.path.join(pred_dir, f"{study.item['case']}_seg.nii.gz"))[0])
    return {
        **result,
        "selection": selection,
        "label_dice": _stats(labels.get("label_dice", [1.0]))["mean"],
        "rows": rows,
        "means": _means(rows),
        "inference_seconds": time.perf_counter() - t0,
    }


def _run_phantom(setup: _Setup, ph: _Phantom, work_dir: str) -> tuple[dict[str, Any], float]:
    """Every run of one phantom (reusing finished ones); its report block and the seconds its runs took."""
    cached_run(os.path.join(ph.root, "data.json"), partial(_make_data, setup, ph), setup.say)
    ph.load()
    truth = cached_run(os.path.join(ph.root, "labels_true.json"), partial(_true_labels, setup, ph), setup.say)
    hu = cached_run(os.path.join(ph.root, "labels_hu.json"), partial(_hu_labels, setup, ph), setup.say)
    raw = cached_run(os.path.join(ph.root, "rules.json"), partial(_rules, setup, ph, hu["window"]), setup.say)
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in setup.seeds:
        seed_dir = os.path.join(ph.root, f"seed{seed}")
        gan = cached_run(os.path.join(seed_dir, "gan.json"), partial(_gan_labels, setup, ph, seed), setup.say)
        labels = {"gan": gan, "hu": hu, "true": truth}
        for label in LABELS:
            for selection in setup.selections:
                name = f"transunet_{label}_{selection}"
                run = partial(_transunet, setup, ph, seed, label, selection, labels[label])
                runs.setdefault(name, []).append(cached_run(os.path.join(seed_dir, f"{name}.json"), run, setup.say))
        runs.setdefault("gan", []).append(gan)
    seconds = sum(
        float(r.get("train_seconds", 0.0)) + float(r.get("inference_seconds", 0.0)) for rs in runs.values() for r in rs
    )
    runs.pop("gan")
    methods = {name: summarize_runs(r) for name, r in runs.items()}
    for name in ("hu_rule", "hu_rule_tuned"):
        methods[name] = summarize_runs([raw[name]])
    last = setup.selections[-1]
    plot_rows = {
        f"TransUNet, {label} labels": [row for r in runs[f"transunet_{label}_{last}"] for row in r["rows"]]
        for label in LABELS
    }
    plot_rows["HU rule"] = raw["hu_rule"]["rows"]
    _plot(
        os.path.join(work_dir, f"{ph.name}_methods_vs_lesion_fraction.png"),
        plot_rows,
        f"phantom {ph.name}, selection {last}: every testing study of every seed (synthetic chest CT)",
    )
    block = {
        "num_test_studies": len(ph.items("testing", labelled=True)),
        "num_train_lesioned": len(hu["label_dice"]),
        "hu_window": [round(w) for w in hu["window"]],
        "hu_window_tuned": [round(w) for w in raw["hu_rule_tuned"]["window"]],
        "hu_label_dice": _stats(hu["label_dice"]),
        "methods": methods,
        "targets": {s: check_targets(methods, s) for s in setup.selections},
    }
    return block, seconds


def run_covid_benchmark(
    work_dir: str,
    phantoms: Sequence[str] = tuple(PHANTOMS),
    seeds: Sequence[int] = (0, 1, 2),
    selections: Sequence[str] = MODEL_SELECTIONS,
    num_cases: int = 36,
    shape: Sequence[int] = (96, 96, 24),
    grid: Sequence[int] = (24, 64, 64),
    gan_epochs: int = 160,
    unet_epochs: int = 60,
    device: str = "cpu",
    data_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    gan_overrides: Mapping[str, Any] | None = None,
    unet_overrides: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the benchmark of the module docstring in ``work_dir``; return the report, also saved there.

    Args:
        work_dir: output folder: ``<phantom>/data``, ``<phantom>/labels_{hu,true}``, ``<phantom>/seed<k>/...`` (the
            GAN, its pseudo-masks, each TransUNet run with its weights and predictions, and one ``.json`` result per
            run), ``covid_benchmark.{json,md}`` and ``<phantom>_methods_vs_lesion_fraction.png``. A run whose result
            file exists is reused: start the same command again after a kill.
        phantoms: names in :data:`PHANTOMS`.
        seeds: training seeds (GAN and TransUNet initial weights, data order); the data are the same for all.
        selections: model selections of the TransUNet runs (:data:`MODEL_SELECTIONS`).
        num_cases: synthetic studies per phantom (split over CT-0..CT-4 as
            :func:`~common.data.synthetic.write.mosmed_category_counts`).
        shape: synthetic CT grid (x, y, z).
        grid: preprocessing grid (z, y, x) of the GAN and the TransUNet; y and x divisible by 16.
        gan_epochs, unet_epochs: epoch budgets of the GAN and of each TransUNet.
        device: ``"cpu"`` or ``"cuda"``.
        data_seed: seed of the synthetic data and of the datalist split.
        val_fraction, test_fraction: datalist split.
        gan_overrides: config overrides of ``train_gan`` and ``pseudo_masks`` (network widths, learning rates,
            ``pseudo_mask_threshold``).
        unet_overrides: config overrides of ``train`` and ``inference`` (TransUNet widths, learning rate, batch).
        progress: called with progress lines (stages, and the budget trainer's).
    """
    unknown = [p for p in phantoms if p not in PHANTOMS] + [s for s in selections if s not in MODEL_SELECTIONS]
    if unknown:
        raise ValueError(f"unknown phantoms or selections {unknown}: phantoms {tuple(PHANTOMS)}, {MODEL_SELECTIONS}")
    work_dir = os.path.abspath(work_dir)
    start = time.perf_counter()
    setup = _Setup(
        seeds=[int(s) for s in seeds],
        selections=list(selections),
        num_cases=int(num_cases),
        shape=[int(s) for s in shape],
        grid=[int(g) for g in grid],
        gan_epochs=int(gan_epochs),
        unet_epochs=int(unet_epochs),
        device=device,
        data_seed=int(data_seed),
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        gan={"roi_size": [int(g) for g in grid], **dict(gan_overrides or {})},
        unet=dict(unet_overrides or {}),
        say=progress or (lambda _msg: None),
    )
    blocks, run_seconds = {}, 0.0
    for name in phantoms:
        blocks[name], seconds = _run_phantom(setup, _Phantom(name, work_dir, setup), work_dir)
        run_seconds += seconds
    report = {
        "config": {
            "phantoms": {p: PHANTOMS[p] for p in phantoms},
            "seeds": setup.seeds,
            "selections": setup.selections,
            "num_cases": setup.num_cases,
            "shape": setup.shape,
            "grid": setup.grid,
            "gan_epochs": setup.gan_epochs,
            "unet_epochs": setup.unet_epochs,
            "device": device,
            "threads": torch.get_num_threads(),
            "data_seed": setup.data_seed,
            "val_fraction": setup.val_fraction,
            "test_fraction": setup.test_fraction,
            "gan_overrides": setup.gan,
            "unet_overrides": setup.unet,
        },
        "phantoms": blocks,
        "seconds": {"total": time.perf_counter() - start, "all_runs": run_seconds},
    }
    write_report(work_dir, "covid_benchmark", report, format_report(report))
    return report
