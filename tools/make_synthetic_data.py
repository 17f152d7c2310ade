"""Write a synthetic dataset in a real public layout (deterministic phantoms, no patient data).

Example::

    python tools/make_synthetic_data.py --layout brats2021 --output_dir /tmp/brats --num_cases 4 \\
        --shape 64,64,48 --seed 0 [--progress false] [--phantom realistic]

Layouts: brats2021, brats2023, msd_task01, mosmed, adni_pairs (see ``common/data/synthetic/write.py``).
``--shape`` defaults to the layout's real size (240,240,155 for BraTS/MSD, 128,128,32 for MosMed, 128,128,128
for ADNI). ``--phantom`` (brain layouts only) picks the tumour phantom: ``basic`` (default) or ``realistic`` (varied
sizes, multifocal, incomplete rims, fading edema, per-case scanners; see ``common/data/synthetic/brain.py``).
Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

try:
    import common  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import run_cli
from common.data.synthetic.brain import check_phantom
from common.data.synthetic.write import check_synthetic_arguments, write_synthetic_dataset
from common.errors import DataError


def make_synthetic_data(
    layout: str,
    output_dir: str,
    num_cases: int = 4,
    shape: str | Sequence[int] | None = None,
    seed: int = 0,
    progress: bool | str = True,
    phantom: str | None = None,
) -> None:
    """Write ``num_cases`` synthetic cases of ``layout`` to ``output_dir`` and print one summary line."""
    try:
        grid = check_synthetic_arguments(layout, output_dir, num_cases, shape, seed)
        options = {}
        if phantom is not None:
            if layout not in ("brats2021", "brats2023", "msd_task01"):
                raise ValueError(f"phantom applies to the brain layouts only, not to {layout!r}")
            options["phantom"] = check_phantom(phantom)
    except ValueError as err:
        raise DataError("make_synthetic_data", str(err)) from err
    show = str(progress).strip().lower() not in ("false", "0", "no", "off")
    case_ids = write_synthetic_dataset(layout, output_dir, num_cases, grid, seed, show, **options)
    print(f"wrote {len(case_ids)} {layout} cases of shape {'x'.join(map(str, grid))} to {output_dir}")


if __name__ == "__main__":
    run_cli(make_synthetic_data)
