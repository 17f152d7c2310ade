"""Ignite handlers the bundles use on top of MONAI's.

MONAI's :class:`~monai.handlers.MetricsSaver` writes per-case CSV files; the collection's evaluate configs also
promise one machine-readable ``summary.json`` (mean of each metric, overall and per region/channel), which the
main job and the model cards read. ``MetricsSummaryJSON`` writes it, atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.io import atomic_path


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


def _nanmean(arr: np.ndarray) -> float | None:
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
