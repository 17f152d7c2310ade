#!/usr/bin/env python3
"""HLWA-UNet vs MONAI SegResNet (Model Zoo settings): Dice per region, step time, inference time, peak memory.

    python tools/benchmark_hlwa.py [--work_dir runs/benchmark_hlwa] [--num_cases 16] [--shape 96,96,64]
        [--roi 64] [--budget_s 300] [--learning_rate 1e-4] [--inference_roi 128] [--inference_repeats 2]
        [--device auto] [--models hlwa,hlwa_modality_dropout,segresnet]

--models picks what is trained: hlwa and segresnet always, plus any of hlwa_modality_dropout, hlwa_no_rcl,
hlwa_masked_rcl (e.g. --models hlwa,segresnet for a long two-model run).

Prints a table and writes benchmark_hlwa.{json,md} to --work_dir. See ``common.benchmarks.hlwa``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.benchmarks.hlwa import check_models, run_benchmark  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.data.synthetic.write import parse_shape  # noqa: E402
from common.errors import DataError  # noqa: E402


def main(
    work_dir: str = "runs/benchmark_hlwa",
    num_cases: int = 16,
    shape="96,96,64",
    roi: int = 64,
    budget_s: float = 300.0,
    learning_rate: float | None = None,
    inference_shape="240,240,155",
    inference_roi: int = 128,
    memory_roi: int = 128,
    inference_repeats: int = 2,
    device: str = "auto",
    seed: int = 0,
    models="hlwa,hlwa_modality_dropout,segresnet",
) -> None:
    try:  # fire turns "a,b" into a tuple; check_models takes either
        names = check_models(models)
    except ValueError as exc:
        raise DataError("--models", str(exc)) from None
    run_benchmark(
        work_dir=work_dir,
        num_cases=num_cases,
        shape=parse_shape(shape),
        roi=roi,
        budget_s=budget_s,
        learning_rate=learning_rate,
        inference_shape=parse_shape(inference_shape),
        inference_roi=inference_roi,
        memory_roi=memory_roi,
        inference_repeats=inference_repeats,
        device=device,
        seed=seed,
        models=names,
    )


if __name__ == "__main__":
    run_cli(main)
