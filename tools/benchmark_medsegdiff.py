#!/usr/bin/env python3
"""MedSegDiff benchmarks: diffusion vs the same backbone trained deterministically, samplers on whole volumes, speed.

    # the benchmark (resumable: rerun the same command after a kill); about 90 min on 2 idle cores
    python tools/benchmark_medsegdiff.py run [--work_dir runs/benchmark_medsegdiff] [--seeds 0,1,2] [--budget_s 360]
        [--num_cases 24] [--num_test 12] [--shape 96,96,64] [--phantom realistic] [--ddpm_cases 2]
        [--models medsegdiff,medsegdiff_residual_fusion,deterministic] [--threads N] [--device auto]
    # the model card's benchmark section, its learning-curve PNG and metadata.json's eval_metrics, from a report
    python tools/benchmark_medsegdiff.py card --report runs/benchmark_medsegdiff/benchmark_medsegdiff.json
    # inference profile on a 181 x 217 x 181 MRI and whole-volume vs slice-by-slice sampling; about 20 min
    python tools/benchmark_medsegdiff.py speed [--work_dir runs/speed_medsegdiff] [--threads N]

See ``common.benchmarks.medsegdiff`` (protocol) and ``common.benchmarks.medsegdiff_speed``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.benchmarks.medsegdiff import MODELS, run_benchmark, update_model_card  # noqa: E402
from common.benchmarks.medsegdiff_speed import run_speed  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.data.synthetic.write import parse_shape  # noqa: E402


def _ints(value) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v]
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _names(value) -> list[str]:
    return [v for v in value.split(",") if v] if isinstance(value, str) else [str(v) for v in value]


def run(
    work_dir: str = "runs/benchmark_medsegdiff",
    seeds="0,1,2",
    budget_s: float = 360.0,
    num_cases: int = 24,
    num_test: int = 12,
    shape="96,96,64",
    phantom: str = "realistic",
    ddpm_cases: int = 2,
    curve_points: int = 4,
    models=",".join(MODELS),
    threads: int | None = None,
    device: str = "auto",
    data_seed: int = 0,
) -> None:
    run_benchmark(
        work_dir=work_dir,
        num_cases=num_cases,
        num_test=num_test,
        shape=parse_shape(shape),
        phantom=phantom,
        models=_names(models),
        seeds=_ints(seeds),
        budget_s=budget_s,
        curve_points=curve_points,
        ddpm_cases=ddpm_cases,
        device=device,
        threads=threads,
        data_seed=data_seed,
    )


def card(report: str = "runs/benchmark_medsegdiff/benchmark_medsegdiff.json") -> None:
    for kind, path in update_model_card(report).items():
        print(f"wrote {kind}: {path}")


def speed(work_dir: str = "runs/speed_medsegdiff", threads: int | None = None, slab: int = 6) -> None:
    run_speed(work_dir=work_dir, threads=threads, slab=slab)


if __name__ == "__main__":
    run_cli({"run": run, "card": card, "speed": speed})
