"""Evaluation report of a lesion segmentation: per-volume and per-slice CSV, plots against lesion fraction, summary.

The COVID-19 pipeline is evaluated (Shabani et al., Computers in Biology and Medicine 2022; El Fahsi et al.) by
Dice, sensitivity and specificity per slice and per volume, and by how they depend on the infected fraction of
the lung. :class:`LesionReportWriter` collects them from an evaluator (metrics of
:func:`common.metrics.lesion.lesion_metrics`), adds per volume HD95 in mm and NSD (normalised surface Dice) at a
tolerance in mm, both from the CT's own spacing on the CT's own grid (:mod:`common.metrics.segmentation`:
MONAI's HD95 and NSD; a volume whose prediction is empty scores 374 mm and NSD 0, the BraTS convention), and
writes, atomically, into ``output_dir``:

- ``metrics_per_volume.csv``: ``case, lesion_fraction, dice, sensitivity, specificity, hd95_mm, nsd, tp, fp, fn,
  tn``;
- ``metrics_per_slice.csv``: ``case, slice, lesion_fraction, dice, sensitivity, specificity``;
- ``<metric>_vs_lesion_fraction.png`` for dice, sensitivity and specificity (slices as dots, volumes as
  circles);
- ``summary.json``: ``num_cases``, ``mean_<metric>`` / ``std_<metric>`` over volumes (also for ``hd95_mm`` and
  ``nsd``), ``slice_mean_<metric>`` over slices (NaN-ignoring; ``None`` where undefined), ``nsd_tolerance_mm``,
  plus any ``extra`` entries.

The NSD tolerance defaults to 3 mm, the tolerance of the COVID-19 CT infection benchmark (Ma et al., "Toward
data-efficient learning: a benchmark for COVID-19 CT lung and infection segmentation", Medical Physics 2021).

MONAI's ``MetricsSaver`` writes one CSV of per-case values of ignite metrics; it has no per-slice rows, no
region of interest for the confusion counts and no plots, hence this handler. :func:`write_lesion_report`
writes the same files from rows computed elsewhere (the benchmark uses it for its baselines).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from monai.utils import convert_to_numpy  # noqa: E402

from common.io import atomic_path  # noqa: E402
from common.metrics.lesion import METRIC_NAMES, confusion_counts, lesion_metrics  # noqa: E402
from common.metrics.segmentation import BRATS_PENALTY_MM, grid_spacing, hd95, surface_dice  # noqa: E402

__all__ = ["LesionReportWriter", "case_rows", "write_lesion_report"]

#: per-volume distance metrics (mm from the CT's spacing), beside the voxel-count ratios of METRIC_NAMES.
DISTANCE_NAMES = ("hd95_mm", "nsd")
#: NSD tolerance (mm) of the COVID-19 CT infection benchmark (Ma et al. 2021).
NSD_TOLERANCE_MM = 3.0
VOLUME_COLUMNS = ("case", "lesion_fraction", *METRIC_NAMES, *DISTANCE_NAMES, "tp", "fp", "fn", "tn")
SLICE_COLUMNS = ("case", "slice", "lesion_fraction", *METRIC_NAMES)


def _spatial(x: Any, name: str) -> np.ndarray:
    arr = convert_to_numpy(x.detach() if isinstance(x, torch.Tensor) else x, wrap_sequence=True)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (1, X, Y, Z) or (X, Y, Z), got shape {arr.shape}")
    return arr


def case_rows(
    case: str,
    pred: Any,
    label: Any,
    lung: Any,
    slice_axis: int = 2,
    spacing: Sequence[float] | None = None,
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The per-volume row and the per-slice rows of one case (see :data:`VOLUME_COLUMNS`, :data:`SLICE_COLUMNS`).

    ``spacing`` (mm per axis of the arrays) defaults to the spacing of ``label``'s affine (a MetaTensor); a plain
    array without ``spacing`` is an error (distances are never computed in voxels).
    """
    if spacing is None:
        spacing = grid_spacing(label, 3)
    p, lab, lu = _spatial(pred, "pred"), _spatial(label, "label"), _spatial(lung, "lung")
    volume, slices = lesion_metrics(p, lab, lu, slice_axis=slice_axis)
    counts = confusion_counts(p, lab, lu)
    distances = {
        "hd95_mm": hd95(p, lab, spacing, BRATS_PENALTY_MM),
        "nsd": surface_dice(p, lab, spacing, nsd_tolerance_mm),
    }
    row = {"case": case, **volume, **distances, **{k: int(counts[k]) for k in ("tp", "fp", "fn", "tn")}}
    slice_rows = [
        {"case": case, "slice": int(z), **{k: float(slices[k][i]) for k in ("lesion_fraction", *METRIC_NAMES)}}
        for i, z in enumerate(slices["slice"])
    ]
    return row, slice_rows


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return (float(arr.mean()), float(arr.std())) if arr.size else (None, None)


def _write_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r[k], float) and not np.isfinite(r[k]) else r[k]) for k in columns})


def _plot(path: str, metric: str, volume_rows: Sequence[Mapping], slice_rows: Sequence[Mapping], title: str) -> None:
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for rows, kw in (
        (slice_rows, {"s": 6, "alpha": 0.35, "color": "tab:gray", "label": "slices"}),
        (volume_rows, {"s": 40, "alpha": 0.9, "color": "tab:red", "edgecolors": "k", "label": "volumes"}),
    ):
        pts = np.asarray([(r["lesion_fraction"], r[metric]) for r in rows], dtype=np.float64).reshape(-1, 2)
        pts = pts[np.isfinite(pts).all(axis=1)]
        ax.scatter(100 * pts[:, 0], pts[:, 1], **kw)
    ax.set_xlabel("lesion fraction of the lung (%)")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"{metric} against lesion fraction", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_lesion_report(
    volume_rows: Sequence[Mapping[str, Any]],
    slice_rows: Sequence[Mapping[str, Any]],
    output_dir: str,
    summary_file: str = "summary.json",
    title: str = "",
    plots: bool = True,
    extra: Mapping[str, Any] | None = None,
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, Any]:
    """Write the CSVs, plots and summary of the module docstring; return the summary.

    ``nsd_tolerance_mm`` is the tolerance the rows' ``nsd`` was computed at (written to the summary).
    """
    os.makedirs(output_dir, exist_ok=True)
    _write_csv(os.path.join(output_dir, "metrics_per_volume.csv"), volume_rows, VOLUME_COLUMNS)
    _write_csv(os.path.join(output_dir, "metrics_per_slice.csv"), slice_rows, SLICE_COLUMNS)
    summary: dict[str, Any] = dict(extra or {})
    summary["num_cases"] = len(volume_rows)
    summary["num_slices"] = len(slice_rows)
    summary["nsd_tolerance_mm"] = float(nsd_tolerance_mm)
    for metric in DISTANCE_NAMES:
        summary[f"mean_{metric}"], summary[f"std_{metric}"] = _stats([r[metric] for r in volume_rows])
    for metric in METRIC_NAMES:
        summary[f"mean_{metric}"], summary[f"std_{metric}"] = _stats([r[metric] for r in volume_rows])
        summary[f"slice_mean_{metric}"], _ = _stats([r[metric] for r in slice_rows])
        if plots:
            png = os.path.join(output_dir, f"{metric}_vs_lesion_fraction.png")
            _plot(png, metric, volume_rows, slice_rows, f"{title} {metric}".strip())
    with atomic_path(os.path.join(output_dir, summary_file)) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


class LesionReportWriter:
    """Ignite handler: lesion metrics of every case an evaluator sees, written when its run completes.

    Reads, from each decollated item of ``engine.state.batch`` / ``engine.state.output`` (output first), the
    binary prediction ``pred_key``, the reference ``label_key`` and the lung mask ``lung_key``, all on one
    grid (``(1, X, Y, Z)``; e.g. the prediction and lung mask mapped back to the CT grid with
    :class:`common.data.chest_ct.LungRestored`), and the case id ``case_key``. The spacing of the distances is
    that of the reference's affine (a MetaTensor on the CT's grid). Cases without a reference (no
    ``label_key``) are skipped. Files: see the module docstring.

    Args:
        output_dir: folder of the report.
        pred_key, label_key, lung_key, case_key: keys of the items. Defaults ``pred``, ``label``, ``lung``, ``case``.
        slice_axis: axial axis of the spatial arrays. Default 2 (NIfTI ``(X, Y, Z)``).
        summary_file: name of the summary JSON. Default ``summary.json``.
        title: prefix of the plot titles.
        plots: write the PNG plots. Default True.
        extra: constant entries added to the summary.
        nsd_tolerance_mm: NSD tolerance in mm. Default 3 (Ma et al. 2021).
    """

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        label_key: str = "label",
        lung_key: str = "lung",
        case_key: str = "case",
        slice_axis: int = 2,
        summary_file: str = "summary.json",
        title: str = "",
        plots: bool = True,
        extra: Mapping[str, Any] | None = None,
        nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
    ) -> None:
        self.output_dir = output_dir
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.pred_key, self.label_key, self.lung_key, self.case_key = pred_key, label_key, lung_key, case_key
        self.slice_axis = slice_axis
        self.summary_file = summary_file
        self.title = title
        self.plots = plots
        self.extra = dict(extra or {})
        self.volume_rows: list[dict[str, Any]] = []
        self.slice_rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.volume_rows, self.slice_rows = [], []

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # not decollated: nothing per case to read
            raise ValueError("LesionReportWriter needs an evaluator with decollate=True")
        for b, o in zip(batch, output):
            item = {**b, **o}
            if self.label_key not in item:
                continue
            case = str(item.get(self.case_key, len(self.volume_rows)))
            row, slices = case_rows(
                case,
                item[self.pred_key],
                item[self.label_key],
                item[self.lung_key],
                self.slice_axis,
                nsd_tolerance_mm=self.nsd_tolerance_mm,
            )
            self.volume_rows.append(row)
            self.slice_rows += slices

    def _write(self, engine: Engine) -> None:
        write_lesion_report(
            self.volume_rows,
            self.slice_rows,
            self.output_dir,
            self.summary_file,
            self.title,
            self.plots,
            self.extra,
            self.nsd_tolerance_mm,
        )
