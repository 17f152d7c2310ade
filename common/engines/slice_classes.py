"""Ignite handler of the pseudo-mask stage: per-slice high/low burden classes of every study, in one JSON file.

The contrastive phase of the COVID-19 TransUNet (El Fahsi et al., on the pseudo-masks of Shabani et al.,
Computers in Biology and Medicine 2022) labels axial slices "high" (pseudo-lesion burden above the upper
quartile) or "low" (between the quartiles). The quartiles are taken over every slice of every study, so the
classes can only be assigned once all studies are processed: this handler collects the per-slice burdens an
evaluator computes (:class:`common.data.pseudo_masks.SliceBurdend`) and writes
:func:`common.data.pseudo_masks.save_slice_classes` when the run completes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ignite.engine import Engine, Events

from common.data.pseudo_masks import save_slice_classes

__all__ = ["SliceClassesWriter"]


class SliceClassesWriter:
    """Collect ``item[burden_key]`` per ``item[case_key]``; write the slice classes JSON at ``Events.COMPLETED``.

    Args:
        output_file: the JSON file, e.g. ``<pseudo_mask_dir>/slice_classes.json``.
        grid: the preprocessing grid ``(z, y, x)`` the burdens are computed on (recorded in the file).
        seed: seed of the class balancing. Default 0.
        burden_key: key of the ``(Z,)`` burdens in the decollated batch/output items. Default ``"slice_burden"``.
        case_key: key of the case id. Default ``"case"``.
    """

    def __init__(
        self,
        output_file: str,
        grid: Sequence[int],
        seed: int = 0,
        burden_key: str = "slice_burden",
        case_key: str = "case",
    ) -> None:
        self.output_file = output_file
        self.grid = [int(g) for g in grid]
        self.seed = int(seed)
        self.burden_key = burden_key
        self.case_key = case_key
        self.burdens: dict[str, np.ndarray] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.burdens = {}

    def _collect(self, engine: Engine) -> None:
        if isinstance(engine.state.output, dict):
            raise ValueError("SliceClassesWriter needs an evaluator with decollate=True")
        for b, o in zip(engine.state.batch, engine.state.output):
            item = {**b, **o}
            if self.burden_key not in item:
                raise KeyError(f"no {self.burden_key!r} in the evaluator's output: add SliceBurdend to postprocessing")
            case = str(item[self.case_key])
            if case in self.burdens:
                raise ValueError(f"{case} was processed twice: the pseudo-mask stage's list has duplicates")
            self.burdens[case] = np.asarray(item[self.burden_key], dtype=np.float64)

    def _write(self, engine: Engine) -> None:
        save_slice_classes(self.output_file, self.burdens, self.grid, self.seed)
