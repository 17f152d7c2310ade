#!/usr/bin/env python3
"""Are GAN pseudo-masks better training labels than an HU window? The COVID-19 bundle on synthetic chest CT.

    python tools/benchmark_covid.py [--work_dir runs/benchmark_covid] [--phantoms plain,realistic] [--seeds 0,1,2]
        [--selections validation,final] [--num_cases 36] [--shape 96,96,24] [--grid 24,64,64] [--gan_epochs 160]
        [--unet_epochs 60] [--gan_channels 8,16,32,64] [--gan_lr 5e-4] [--gan_d_lr 1e-4] [--recon_weight 10]
        [--pseudo_mask_threshold 0.2] [--unet_width small|default] [--unet_lr 1e-3] [--device auto] [--threads N]

For each phantom and seed: the GAN and its pseudo-masks, HU-window pseudo-masks and the true masks, the same TransUNet
trained on each under both model selections, the raw HU rules; all in-process through the bundle's configs and the
shared budget trainer (epoch budgets). Finished runs are reused: after a kill, run the same command again. The
defaults are the run reported in the bundle's model card. Writes covid_benchmark.{json,md} and
<phantom>_methods_vs_lesion_fraction.png to --work_dir. See ``common.benchmarks.covid``.
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


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return [str(v) for v in value]


def main(
    work_dir: str = "runs/benchmark_covid",
    phantoms="plain,realistic",
    seeds="0,1,2",
    selections="validation,final",
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
    data_seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    import torch

    from common.benchmarks.covid import PHANTOMS, run_covid_benchmark
    from common.bundle.main_job import resolve_device
    from common.engines.contrastive_segmentation import MODEL_SELECTIONS

    if threads is not None:
        torch.set_num_threads(int(threads))
    if unet_width not in UNET_WIDTHS:
        raise DataError("--unet_width", f"must be one of {sorted(UNET_WIDTHS)}, got {unet_width!r}")
    bad = [p for p in _names(phantoms) if p not in PHANTOMS] + [
        s for s in _names(selections) if s not in MODEL_SELECTIONS
    ]
    if bad:
        raise DataError(
            "--phantoms/--selections", f"unknown {bad}: phantoms {list(PHANTOMS)}, {list(MODEL_SELECTIONS)}"
        )
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
        phantoms=_names(phantoms),
        seeds=_ints(seeds),
        selections=_names(selections),
        num_cases=int(num_cases),
        shape=_ints(shape),
        grid=grid_l,
        gan_epochs=int(gan_epochs),
        unet_epochs=int(unet_epochs),
        device=resolve_device(device),
        data_seed=int(data_seed),
        gan_overrides=gan,
        unet_overrides=unet,
    )
    print(f"\nwritten: {os.path.join(os.path.abspath(work_dir), 'covid_benchmark.md')}")


if __name__ == "__main__":
    run_cli(main)
