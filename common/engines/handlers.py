"""Ignite handlers the bundles use on top of MONAI's.

MONAI's :class:`~monai.handlers.MetricsSaver` writes per-case CSV files; the collection's evaluate configs also
promise one machine-readable ``summary.json`` (mean of each metric, overall and per region/channel), which the
main job and the model cards read. ``MetricsSummaryJSON`` writes it, atomically. ``SegmentationMetricsHandler``
drives :class:`common.metrics.segmentation.SegmentationMetrics` (HD95 and NSD in mm, BraTS lesion-wise scores)
and files each of its metrics under its own name, as if each were a MONAI metric handler.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import IgniteMetricHandler

from common.io import atomic_path
from common.metrics.segmentation import (
    BRATS_DILATION,
    BRATS_MIN_LESION_MM3,
    BRATS_PENALTY_MM,
    METRIC_NAMES,
    SegmentationMetrics,
)


class MetricsSummaryJSON:
    """Write ``summary.json`` with every metric of an evaluator when its run completes.

    For each metric with per-case details in ``engine.state.metric_details`` (a ``(cases, channels)`` tensor,
    as MONAI's metric handlers store with ``save_details=True``) it writes the NaN-ignoring mean per channel
    (named by ``channel_names``) and over channels; key metrics in ``engine.state.metrics`` are written as is.

    Args:
        output_dir: folder for the file.
        filename: file name, default ``summary.json``.
        channel_names: names of the metric channels, e.g. ``("TC", "WT", "ET")``.
        extra: constant entries to add (e.g. the bundle name).
    """

    def __init__(
        self,
        output_dir: str,
        filename: str = "summary.json",
        channel_names: Sequence[str] | None = None,
        extra: dict | None = None,
    ) -> None:
        self.path = os.path.join(output_dir, filename)
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        summary: dict[str, float | int | str] = dict(self.extra)
        for name, value in engine.state.metrics.items():
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                summary[name] = _finite_or_none(float(value))
        details = getattr(engine.state, "metric_details", {}) or {}
        for name, table in details.items():
            arr = np.asarray(table.detach().cpu() if torch.is_tensor(table) else table, dtype=np.float64)
            arr = arr.reshape(arr.shape[0], -1)
            summary["num_cases"] = int(arr.shape[0])
            per_channel = [_nanmean(arr[:, c]) for c in range(arr.shape[1])]
            names = (
                self.channel_names
                if self.channel_names and len(self.channel_names) == len(per_channel)
                else [str(c) for c in range(len(per_channel))]
            )
            for cname, value in zip(names, per_channel):
                summary[f"{name}_{cname}"] = value
            summary[f"mean_{name}"] = _nanmean(arr)
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            json.dump(summary, f, indent=2)


class SegmentationMetricsHandler(IgniteMetricHandler):
    """Ignite metric: :class:`~common.metrics.segmentation.SegmentationMetrics` of every case an evaluator sees.

    One pass over each case computes all of :data:`~common.metrics.segmentation.METRIC_NAMES` (``hd95_mm``,
    ``nsd``, ``lesion_dice``, ``lesion_hd95_mm``, ``lesions_tp``, ``lesions_fn``, ``lesions_fp``); at the end of
    the run each mean over cases and regions goes to ``engine.state.metrics[<name>]`` and, with
    ``save_details``, each ``(cases, regions)`` table to ``engine.state.metric_details[<name>]``, where MONAI's
    ``MetricsSaver`` and :class:`MetricsSummaryJSON` find them. The spacing of every case is read from the affine
    of its reference (``y``, a MetaTensor): distances are in mm on the grid the metric is computed on. MONAI's
    ``IgniteMetricHandler`` keeps one buffer under one name, hence this subclass.

    Args:
        nsd_tolerance_mm, dilation, min_lesion_volume_mm3, penalty_mm: see ``SegmentationMetrics``.
        output_transform: engine output -> ``(y_pred, y)``, e.g. ``from_engine(["pred", "label"])``.
        save_details: store the per-case tables. Default True.
    """

    def __init__(
        self,
        nsd_tolerance_mm: float | Sequence[float] = 1.0,
        dilation: int = BRATS_DILATION,
        min_lesion_volume_mm3: float = BRATS_MIN_LESION_MM3,
        penalty_mm: float = BRATS_PENALTY_MM,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = SegmentationMetrics(nsd_tolerance_mm, dilation, min_lesion_volume_mm3, penalty_mm)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
        # ignite's documented result mode: each key of the returned dict becomes a metric of its own
        self._metrics_result_mode = "flatten"

    def compute(self) -> dict[str, float]:
        if self.save_details:
            if self._engine is None:
                raise RuntimeError("SegmentationMetricsHandler: call attach() first")
            table = self.metric_fn.get_buffer()
            for i, name in enumerate(METRIC_NAMES):
                self._engine.state.metric_details[name] = table[..., i]
        self._is_reduced = True
        return self.metric_fn.aggregate()


def meta_from_engine(key: str = "image") -> Callable[[Sequence[Mapping[str, Any]]], list[dict]]:
    """A ``batch_transform`` for MONAI's ``MetricsSaver``: a decollated batch -> the metadata of ``key`` per case.

    ``MetricsSaver`` names each row of its per-case CSV files by the ``filename_or_obj`` of these dictionaries;
    the counterpart of ``monai.handlers.from_engine``, which returns the tensors instead. In a config:
    ``"batch_transform": "$meta_from_engine('image')"``.
    """
    return functools.partial(_meta_of, key=key)


def _meta_of(batch: Sequence[Mapping[str, Any]], key: str) -> list[dict]:
    return [case[key].meta for case in batch]


def output_items(keys: Sequence[str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """An ``output_transform``: an engine's output dict -> its items ``keys``, e.g. the losses a ``StatsHandler``
    or ``TensorBoardStatsHandler`` logs as scalars, one per key (``monai.handlers.from_engine`` gives a tuple,
    which they do not log)."""
    return functools.partial(_items_of, keys=tuple(keys))


def _items_of(output: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: output[k] for k in keys}


def _nanmean(arr: np.ndarray) -> float | None:
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
