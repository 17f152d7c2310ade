"""Ignite handler that evaluates an image fusion network against classical baselines, case by case.

MONAI's :class:`~monai.handlers.MetricsSaver` writes the metrics of one prediction per case; fusion is judged by
comparing methods on the same cases (the network, and the classical fusions of
:mod:`common.networks.fusion_baselines` of the same sources), with metrics computed in numpy (FSIM, Qabf, MI, ...)
that are no MONAI metrics. :class:`FusionMetricsSaver` therefore scores every method on every case with :class:`~common.metrics.fusion.FusionScorer` and writes one CSV
table (a row per case, method and protocol) and a ``summary.json`` with means and the ranking, both atomically.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.io import atomic_path
from common.metrics.fusion import RANKING_METRICS, FusionScorer, rank_methods
from common.networks.fusion_baselines import BASELINES

__all__ = ["PROTOCOLS", "FusionMetricsSaver", "summarize_rows"]

#: ``volume``: the whole volume (3D PSNR/SSIM, histograms of all voxels, Qabf and FSIM over all axial slices);
#: ``slice``: one axial slice, the paper's protocol (slice 64 of the 128^3 volume: the middle one)
PROTOCOLS = ("volume", "slice")

logger = logging.getLogger(__name__)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summarize_rows(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str] | None = None,
    reduce: Callable[[np.ndarray], float] = np.mean,
) -> dict[str, dict[str, dict]]:
    """Per protocol and method, the mean (or ``reduce``) of every metric over the cases (NaN values skipped).

    Args:
        rows: dicts with ``method``, ``protocol`` and metric values (other keys are ignored if ``metrics`` is
            given; otherwise every numeric key except ``case`` is a metric).
        metrics: metric names to average (default: the numeric keys of the first row).
        reduce: ``reduce(values) -> float`` over one metric's non-NaN values (default the mean; e.g. a standard
            deviation).

    Returns:
        ``{protocol: {method: {metric: mean}}}``; a mean over infinite values is ``inf``; NaN where every value is.
    """
    if not rows:
        return {}
    if metrics is None:
        metrics = [k for k, v in rows[0].items() if k not in ("case", "method", "protocol") and isinstance(v, float)]
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["protocol"], {}).setdefault(row["method"], {m: [] for m in metrics})
        for m in metrics:
            out[row["protocol"]][row["method"]][m].append(float(row[m]))
    for methods in out.values():
        for name, values in methods.items():
            means = {}
            for m, v in values.items():
                arr = np.asarray(v, dtype=np.float64)
                arr = arr[~np.isnan(arr)]
                means[m] = float(reduce(arr)) if arr.size else math.nan
            methods[name] = means
    return out


class FusionMetricsSaver:
    """Score the fused output of an evaluator and classical baselines on every case; write CSV and summary.json.

    Per item of each iteration (``engine.state.output[i]``, after MONAI's decollation and postprocessing) the
    fused volume ``output[pred_key]`` ``(1, *S)`` is compared with the stacked sources ``output[sources_key]``
    ``(2, *S)`` = (MRI, PET), in the network's input space (the paper evaluates there too). The baselines fuse the
    same sources. Every method is scored with every metric of :class:`~common.metrics.fusion.FusionScorer` under
    each protocol of :data:`PROTOCOLS` requested.

    When the run completes it writes (atomically):

    - ``<output_dir>/<csv_name>``: one row per case, method and protocol: ``case, method, protocol, psnr, ssim,
      nmi, mi, fsim, qabf, entropy, psnr_min`` and the per-source values (``psnr_mri``, ``ssim_pet``, ...);
    - ``<output_dir>/<summary_name>``: ``num_cases``; at top level the mean of every metric of ``method_name``
      under the first protocol (so ``ssim`` is the network's SSIM averaged over (F, MRI) and (F, PET));
      ``means``: ``{protocol: {method: {metric: mean}}}``; ``ranking``: ``{protocol: rank_methods(...)}`` on
      :data:`~common.metrics.fusion.RANKING_METRICS`. Non-finite means are written as null.

    Args:
        output_dir: destination folder.
        method_name: name of the network's row (default ``"dc2fusion"``).
        pred_key: key of the fused output (default ``"pred"``).
        sources_key: key of the stacked sources, MRI first (default ``"label"``, where the bundle's transforms put
            them for the unsupervised loss).
        case_key: key of the case id in the batch (default ``"case"``).
        baselines: names in :data:`~common.networks.fusion_baselines.BASELINES` (default all).
        protocols: subset of :data:`PROTOCOLS` (default both).
        slice_axis: axis of the slice protocol and of the slice-wise Qabf/FSIM (default -1, axial in RAS).
        slice_index: slice of the slice protocol (default None: the middle one, 64 of 128).
        data_range: intensity range of the images (default 1.0).
        csv_name: per-case table (default ``"fusion_metrics.csv"``).
        summary_name: summary file (default ``"summary.json"``).
    """

    def __init__(
        self,
        output_dir: str,
        method_name: str = "dc2fusion",
        pred_key: str = "pred",
        sources_key: str = "label",
        case_key: str = "case",
        baselines: Sequence[str] = tuple(BASELINES),
        protocols: Sequence[str] = PROTOCOLS,
        slice_axis: int = -1,
        slice_index: int | None = None,
        data_range: float = 1.0,
        csv_name: str = "fusion_metrics.csv",
        summary_name: str = "summary.json",
    ) -> None:
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {sorted(BASELINES)}.")
        protocols = tuple(protocols)
        if not protocols or any(p not in PROTOCOLS for p in protocols):
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {protocols}.")
        if method_name in baselines:
            raise ValueError(f"method_name {method_name!r} clashes with a baseline name.")
        self.output_dir = output_dir
        self.method_name = method_name
        self.pred_key, self.sources_key, self.case_key = pred_key, sources_key, case_key
        self.baselines = tuple(baselines)
        self.protocols = protocols
        self.slice_axis, self.slice_index = slice_axis, slice_index
        self.data_range = data_range
        self.csv_path = os.path.join(output_dir, csv_name)
        self.summary_path = os.path.join(output_dir, summary_name)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score_iteration)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def score_case(self, case: str, fused: Any, sources: Any) -> list[dict[str, Any]]:
        """Rows for one case: every method under every protocol. ``fused`` ``(1, *S)``, ``sources`` ``(2, *S)``."""
        f, src = _numpy(fused).astype(np.float64), _numpy(sources).astype(np.float64)
        if src.ndim != 4 or src.shape[0] != 2:
            raise ValueError(f"case {case}: sources must be (2, D, H, W) = (MRI, PET), got {src.shape}.")
        if f.shape != (1, *src.shape[1:]):
            raise ValueError(f"case {case}: fused must be (1, {src.shape[1:]}), got {f.shape}.")
        mri, pet = src[0], src[1]
        candidates = {self.method_name: f[0]}
        candidates.update({name: BASELINES[name](mri, pet) for name in self.baselines})
        rows = []
        for protocol in self.protocols:
            index = None
            if protocol == "slice":
                size = mri.shape[self.slice_axis]
                index = size // 2 if self.slice_index is None else self.slice_index
            scorer = FusionScorer(mri, pet, slice_index=index, axis=self.slice_axis, data_range=self.data_range)
            for method, image in candidates.items():
                rows.append({"case": str(case), "method": method, "protocol": protocol, **scorer(image)})
        return rows

    def score_iteration(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for i, (out, batch) in enumerate(zip(outputs, batches)):
            case = batch.get(self.case_key, out.get(self.case_key, f"{engine.state.iteration}_{i}"))
            self.rows.extend(self.score_case(case, out[self.pred_key], out[self.sources_key]))

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json`` for the rows scored so far."""
        means = summarize_rows(self.rows)
        first = self.protocols[0]
        summary: dict[str, Any] = {
            "num_cases": len({row["case"] for row in self.rows}),
            "method": self.method_name,
            "protocol": first,
        }
        summary.update({k: _finite_or_none(v) for k, v in means.get(first, {}).get(self.method_name, {}).items()})
        summary["means"] = {
            protocol: {method: {k: _finite_or_none(v) for k, v in values.items()} for method, values in methods.items()}
            for protocol, methods in means.items()
        }
        summary["ranking_metrics"] = list(RANKING_METRICS)
        summary["ranking"] = {protocol: rank_methods(methods) for protocol, methods in means.items()}
        return summary

    def write(self, engine: Engine | None = None) -> None:
        if not self.rows:
            logger.warning("FusionMetricsSaver: no case was scored, nothing written.")
            return
        fields = list(self.rows[0])
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        summary = self.summary()
        with atomic_path(self.summary_path) as tmp, open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        for protocol, ranking in summary["ranking"].items():
            means = summary["means"][protocol]
            table = ", ".join(
                f"{method} " + "/".join(_short(means[method][m]) for m in RANKING_METRICS) for method in ranking
            )
            logger.info(f"fusion metrics ({protocol}; {'/'.join(RANKING_METRICS)}, best first): {table}")


def _short(value: float | None) -> str:
    return "inf/nan" if value is None else f"{value:.4g}"
