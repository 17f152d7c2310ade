#!/usr/bin/env python3
"""HLWA-UNet vs MONAI SegResNet (Model Zoo settings) and SwinUNETR under 300/600/1200 s budgets, 3 seeds.

    python tools/benchmark_hlwa.py [--work_dir runs/benchmark_hlwa] [--num_cases 40] [--shape 96,96,64]
        [--roi 64] [--budgets_s 300,600,1200] [--seeds 0,1,2] [--learning_rate 1e-3] [--curve_every_s 100]
        [--jobs 2] [--threads 1] [--device cpu] [--models hlwa,segresnet,swinunetr] [--update_bundle true]
        [--pilot true]

The protocol is in ``common/benchmarks/hlwa.py``. Resumable: the same command with the same ``--work_dir`` reuses
every finished run (``<work_dir>/runs/<model>_seed<k>.json``) and measurement. Writes benchmark_hlwa.{json,md}
and benchmark_hlwa_learning_curve.png to ``--work_dir``; ``--update_bundle true`` also writes the model card's
benchmark section, its learning-curve PNG and ``eval_metrics`` in the bundle's metadata.json from the report.
``--models`` may add the HLWA variants ``hlwa_modality_dropout``, ``hlwa_no_rcl``, ``hlwa_masked_rcl``.
``--pilot true`` allows fewer than 3 seeds or 12 test cases, to check the pipeline (never written into the card).
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.benchmarks.hlwa import ProtocolError, check_models, run_benchmark, update_bundle_docs  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.data.synthetic.write import parse_shape  # noqa: E402
from common.errors import DataError  # noqa: E402


def _numbers(value, kind=float) -> list:
    """``"300,600"``, ``(300, 600)`` (what fire makes of ``300,600``) or ``300`` -> ``[300.0, 600.0]``."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    return [kind(v) for v in items if str(v).strip()]


def main(
    work_dir: str = "runs/benchmark_hlwa",
    num_cases: int = 40,
    shape="96,96,64",
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
    roi: int = 64,
    budgets_s="300,600,1200",
    curve_every_s: float = 100.0,
    seeds="0,1,2",
    learning_rate: float = 1e-3,
    models="hlwa,segresnet,swinunetr",
    jobs: int = 1,
    threads: int = 1,
    data_seed: int = 0,
    inference_shape="240,240,155",
    inference_roi: int = 128,
    inference_repeats: int = 2,
    device: str = "cpu",
    update_bundle: bool = False,
    pilot: bool = False,
) -> None:
    try:
        names = check_models(models)
        budgets, seed_list = _numbers(budgets_s), _numbers(seeds, int)
        grid, inference_grid = parse_shape(shape), parse_shape(inference_shape)
    except ValueError as exc:
        raise DataError("benchmark_hlwa", str(exc)) from None
    try:
        report = run_benchmark(
            work_dir=work_dir,
            num_cases=num_cases,
            shape=grid,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            roi=roi,
            budgets_s=budgets,
            curve_every_s=curve_every_s,
            seeds=seed_list,
            learning_rate=learning_rate,
            models=names,
            jobs=jobs,
            threads=threads,
            data_seed=data_seed,
            inference_shape=inference_grid,
            inference_roi=inference_roi,
            inference_repeats=inference_repeats,
            device=device,
            pilot=pilot,
        )
    except ProtocolError as exc:
        raise DataError("benchmark_hlwa", str(exc)) from None
    if update_bundle:
        for path in update_bundle_docs(report):
            print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
