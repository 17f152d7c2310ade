#!/usr/bin/env python3
"""The COVID-19 bundle end to end on synthetic chest CT: GAN pseudo-mask Dice; TransUNet trained on pseudo-masks,
on true masks (upper bound), and an HU-threshold baseline, all scored per volume and per slice.

    python tools/benchmark_covid.py [--work_dir runs/benchmark_covid] [--num_cases 36] [--shape 96,96,24]
        [--grid 24,64,64] [--gan_epochs 160] [--unet_epochs 60] [--gan_channels 8,16,32,64] [--gan_lr 5e-4]
        [--gan_d_lr 1e-4] [--recon_weight 10] [--pseudo_mask_threshold 0.2] [--unet_width small|default]
        [--unet_lr 1e-3] [--device auto] [--threads N]

The defaults are the run reported in the bundle's model card (about 18 minutes on a 2-core CPU with --threads 1).

Prints the tables and writes covid_benchmark.{json,md}, report/<method>/ (CSV, plots, summary.json) and
report/methods_vs_lesion_fraction.png to --work_dir. See ``common.benchmarks.covid``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import run_cli  # noqa: E402
from common.errors import DataError  # noqa: E402

#: TransUNet sizes: "small" for a CPU run on 64 x 64 slices, "default" the bundle's (the paper's layout)
UNET_WIDTHS = {
    "small": {
        "network_def#stem_channels": 16,
        "network_def#encoder_channels": [32, 64, 128],
        "network_def#vit_layers": 2,
        "network_def#vit_heads": 4,
        "network_def#vit_mlp_dim": 128,
        "network_def#hidden_size": 64,
        "network_def#head_channels": 64,
        "network_def#decoder_channels": [64, 32, 16, 8],
        "network_def#proj_dim": 32,
    },
    "default": {},
}


def _ints(value) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.replace("x", ",").split(",") if v]
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def main(
    work_dir: str = "runs/benchmark_covid",
    num_cases: int = 36,
    shape="96,96,24",
    grid="24,64,64",
    gan_epochs: int = 160,
    unet_epochs: int = 60,
    gan_channels="8,16,32,64",
    gan_noise_channels: int = 8,
    disc_channels="8,16,32",
    gan_lr: float = 5e-4,
    gan_d_lr: float = 1e-4,
    recon_weight: float = 10.0,
    gan_batch_size: int = 4,
    pseudo_mask_threshold: float = 0.2,
    unet_width: str = "small",
    unet_lr: float = 1e-3,
    unet_batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    echo: bool = False,
) -> None:
    if threads is not None:  # the stages run as subprocesses: they inherit it
        os.environ["OMP_NUM_THREADS"] = str(int(threads))
    from common.benchmarks.covid import run_covid_benchmark
    from common.bundle.main_job import resolve_device

    if unet_width not in UNET_WIDTHS:
        raise DataError("--unet_width", f"must be one of {sorted(UNET_WIDTHS)}, got {unet_width!r}")
    grid_l = _ints(grid)
    gan = {
        "network_def#channels": _ints(gan_channels),
        "network_def#noise_channels": int(gan_noise_channels),
        "discriminator_def#channels": _ints(disc_channels),
        "learning_rate": float(gan_lr),
        "d_learning_rate": float(gan_d_lr),
        "recon_weight": float(recon_weight),
        "batch_size": int(gan_batch_size),
        "pseudo_mask_threshold": float(pseudo_mask_threshold),
        "val_interval": 1000,
    }
    unet = {
        **UNET_WIDTHS[unet_width],
        "network_def#img_size": grid_l[-1],
        "learning_rate": float(unet_lr),
        "batch_size": int(unet_batch_size),
        "contrastive_batch_size": int(unet_batch_size),
    }
    run_covid_benchmark(
        work_dir,
        num_cases=int(num_cases),
        shape=_ints(shape),
        grid=grid_l,
        gan_epochs=int(gan_epochs),
        unet_epochs=int(unet_epochs),
        seed=int(seed),
        device=resolve_device(device),
        gan_overrides=gan,
        unet_overrides=unet,
        echo=bool(echo),
    )
    print(f"\nwritten: {os.path.join(os.path.abspath(work_dir), 'covid_benchmark.md')}")


if __name__ == "__main__":
    run_cli(main)
