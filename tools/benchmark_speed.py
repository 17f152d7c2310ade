#!/usr/bin/env python3
"""Training step time, inference time, peak memory and achieved FLOP/s of every bundle's network and of MONAI's
SegResNet, SwinUNETR and UNETR, before and after each speed switch; same command on the CPU and on CUDA.

    python tools/benchmark_speed.py [--work_dir runs/benchmark_speed] [--networks hlwa,segresnet]
        [--inputs brain,roi] [--modes train,infer] [--switches sdpa,bf16,fp16,channels_last,compile,checkpointing]
        [--device auto] [--repeats 3] [--warmup 1] [--brain_roi 128] [--volume 240,240,155] [--threads N]
        [--profile auto] [--timeout_s 1800] [--tiny]

networks: hlwa, medsegdiff, transunet, covid_gan, dc2fusion, segresnet, swinunetr, unetr. The shipped variant is
always measured; each switch is measured against it. --tiny runs tiny networks and sizes (seconds per row).
Prints progress and a Markdown table; writes speed.json and speed.md (and profiler traces on CUDA) to --work_dir.
See ``common.benchmarks.speed`` for the protocol.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.benchmarks.speed import INPUTS, MODES, NETWORKS, SWITCHES, parse_names, run_benchmark  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.data.synthetic.write import parse_shape  # noqa: E402
from common.errors import DataError  # noqa: E402


def main(
    work_dir: str = "runs/benchmark_speed",
    networks=",".join(NETWORKS),
    inputs=",".join(INPUTS),
    modes=",".join(MODES),
    switches=None,
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    brain_roi: int = 128,
    volume="240,240,155",
    threads: int | None = None,
    profile="auto",
    timeout_s: float = 1800.0,
    tiny: bool = False,
) -> None:
    # fire turns "a,b" into a tuple; parse_names takes either
    for flag, value, allowed in (("--networks", networks, NETWORKS), ("--inputs", inputs, INPUTS),
                                 ("--modes", modes, MODES), ("--switches", switches, SWITCHES)):  # fmt: skip
        if value is not None:
            try:
                parse_names(value, allowed, flag.lstrip("-").rstrip("s"))
            except ValueError as exc:
                raise DataError(flag, str(exc)) from None
    run_benchmark(
        work_dir=work_dir,
        networks=networks,
        inputs=inputs,
        modes=modes,
        switches=switches,
        device=device,
        repeats=repeats,
        warmup=warmup,
        brain_roi=brain_roi,
        volume=parse_shape(volume),
        tiny=tiny,
        threads=threads,
        profile=None if profile == "auto" else bool(profile),
        timeout_s=timeout_s,
    )


if __name__ == "__main__":
    run_cli(main)
