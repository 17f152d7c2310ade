#!/usr/bin/env python3
"""MedSegDiff samplers: per-volume Dice and seconds per slice, DDPM-1000 vs DDIM 10/25/50, ensembles of 1 and 5.

    python tools/benchmark_medsegdiff.py [--work_dir runs/benchmark_medsegdiff] [--num_cases 10] [--shape 64,64,48]
        [--roi 32] [--channels 16,32,64] [--iterations 600] [--x0_loss_weight 1.0] [--eval_slices 2] [--num_test 3]
        [--threads 1]
        [--device auto] [--seed 0]

Trains the bundle's MedSegDiff once on synthetic BraTS-layout data (a fixed number of iterations), then samples the
held-out volumes with every sampler; prints a table and writes benchmark_medsegdiff.{json,md} to --work_dir.
See ``common.benchmarks.medsegdiff``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.benchmarks.medsegdiff import run_benchmark  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.data.synthetic.write import parse_shape  # noqa: E402


def _ints(value) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v]
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def main(
    work_dir: str = "runs/benchmark_medsegdiff",
    num_cases: int = 10,
    shape="64,64,48",
    roi: int = 32,
    channels="16,32,64",
    iterations: int = 600,
    learning_rate: float = 5e-4,
    ema_decay: float = 0.99,
    x0_loss_weight: float = 1.0,
    eval_slices: int = 2,
    num_test: int = 3,
    threads: int | None = 1,
    device: str = "auto",
    seed: int = 0,
) -> None:
    run_benchmark(
        work_dir=work_dir,
        num_cases=num_cases,
        shape=parse_shape(shape),
        roi=roi,
        channels=_ints(channels),
        iterations=iterations,
        learning_rate=learning_rate,
        ema_decay=ema_decay,
        x0_loss_weight=x0_loss_weight,
        eval_slices=eval_slices,
        num_test=num_test,
        threads=threads,
        device=device,
        seed=seed,
    )


if __name__ == "__main__":
    run_cli(main)
