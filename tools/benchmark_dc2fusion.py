#!/usr/bin/env python3
"""DC2Fusion vs average, maximum and Laplacian-pyramid fusion (and plain copies of MRI / PET), after a fixed
training budget on synthetic MRI-PET pairs: every fusion metric side by side, ranked by SSIM, Qabf and min PSNR.

    python tools/benchmark_dc2fusion.py [--work_dir runs/benchmark_dc2fusion] [--num_cases 9] [--shape 48,48,48]
        [--roi 48] [--steps 100] [--learning_rate 2e-3] [--embed_dim 24] [--depths 1,1,1] [--num_heads 2,4,8]
        [--device auto] [--threads N]

Prints the tables and writes benchmark_dc2fusion.{json,md}, model.pt and panel.png to --work_dir.
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


def main(
    work_dir: str = "runs/benchmark_dc2fusion",
    num_cases: int = 9,
    test_fraction: float = 0.34,
    shape="48,48,48",
    roi: int = 48,
    pad: int | None = None,
    steps: int = 100,
    learning_rate: float = 2e-3,
    embed_dim: int = 24,
    depths="1,1,1",
    num_heads="2,4,8",
    head_channels: int = 8,
    protocols="volume,slice",
    device: str = "auto",
    threads: int | None = None,
    seed: int = 3407,
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
        learning_rate=learning_rate,
        embed_dim=embed_dim,
        depths=_ints(depths),
        num_heads=_ints(num_heads),
        head_channels=head_channels,
        protocols=[p for p in (protocols.split(",") if isinstance(protocols, str) else protocols) if p],
        device=device,
        threads=threads,
        seed=seed,
        data_seed=data_seed,
    )


if __name__ == "__main__":
    run_cli(main)
