#!/usr/bin/env python3
"""DC2Fusion vs average, maximum, Laplacian-pyramid and guided-filter fusion (with a plain copy of the MRI as the
sanity row, a copy of the PET, and the DC2Fusion loss optimum), after a fixed budget of optimiser steps per seed on
synthetic MRI-PET pairs: every fusion metric, mean +- sd over held-out pairs, winners and targets met or missed.

    python tools/benchmark_dc2fusion.py [--work_dir runs/benchmark_dc2fusion] [--steps 4000] [--seeds 3407,3408]
        [--heads paper] [--num_cases 20] [--shape 48,48,48] [--roi 48] [--learning_rate 2e-3] [--threads N]

Resumable: finished runs in --work_dir/runs are reused. Prints progress and the tables, and writes
benchmark_dc2fusion.{json,md}, model_<head>_seed<seed>.pt and panel_<head>_seed<seed>.png to --work_dir.
See ``common.benchmarks.dc2fusion``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.benchmarks.dc2fusion import run_benchmark  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.data.synthetic.write import parse_shape  # noqa: E402


def _ints(value) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.replace("x", ",").split(",") if v]
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _names(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


def main(
    work_dir: str = "runs/benchmark_dc2fusion",
    num_cases: int = 20,
    test_fraction: float = 0.4,
    shape="48,48,48",
    roi: int = 48,
    pad: int | None = None,
    steps: int = 4000,
    checkpoint_steps="500,1000,2000,3000",
    learning_rate: float = 2e-3,
    seeds="3407,3408",
    heads="paper",
    embed_dim: int = 24,
    depths="1,1,1",
    num_heads="2,4,8",
    protocols="volume,slice",
    loss_optimum_steps: int = 300,
    device: str = "cpu",
    threads: int | None = None,
    data_seed: int = 0,
) -> None:
    run_benchmark(
        work_dir=work_dir,
        num_cases=num_cases,
        test_fraction=test_fraction,
        shape=parse_shape(shape),
        roi=roi,
        pad=pad,
        steps=steps,
        checkpoint_steps=_ints(checkpoint_steps) if checkpoint_steps not in (None, "") else [],
        learning_rate=learning_rate,
        seeds=_ints(seeds),
        heads=_names(heads),
        embed_dim=embed_dim,
        depths=_ints(depths),
        num_heads=_ints(num_heads),
        protocols=_names(protocols),
        loss_optimum_steps=loss_optimum_steps,
        device=device,
        threads=threads,
        data_seed=data_seed,
    )


if __name__ == "__main__":
    run_cli(main)
