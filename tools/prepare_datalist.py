"""Build the datalist JSON of a dataset folder in one of the supported layouts.

Example::

    python tools/prepare_datalist.py --layout brats2021 --data_dir /data/BraTS2021 --output datalist.json \\
        --seed 0 --val_fraction 0.2 --test_fraction 0.1 [--num_folds 5 --fold 0] [--check_data false]

Layouts: brats2021, brats2023, msd_task01, mosmed, adni_pairs, and any registered later (``common/data/layouts/``).
Prints one summary line. On bad data it prints one line naming the file(s), exits with status 2 and
writes no output file.
"""

from __future__ import annotations

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import run_cli
from common.data.datalist import build_datalist, check_split_options, save_datalist
from common.errors import DataError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _flag(name: str, value: bool | int | str) -> bool:
    """Accept fire's booleans and the spellings ``true/false/1/0/yes/no``."""
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DataError(f"--{name}", f"expected true or false, got {value!r}")


def prepare_datalist(
    layout: str,
    data_dir: str,
    output: str,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    num_folds: int | None = None,
    fold: int = 0,
    check_data: bool | str = True,
    progress: bool | str = True,
    num_workers: int = 1,
) -> None:
    """Scan DATA_DIR in LAYOUT, check every file (unless --check_data false), split, write OUTPUT."""
    try:
        check_split_options(str(layout), float(val_fraction), float(test_fraction), num_folds, int(fold))
    except ValueError as err:  # an option error is a user error, not a bug: one line, exit 2
        raise DataError("prepare_datalist", str(err)) from err
    datalist = build_datalist(
        str(layout),
        str(data_dir),
        seed=int(seed),
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        num_folds=None if num_folds is None else int(num_folds),
        fold=int(fold),
        check_data=_flag("check_data", check_data),
        progress=_flag("progress", progress),
        num_workers=int(num_workers),
    )
    save_datalist(datalist, output)
    counts = ", ".join(f"{len(datalist[k])} {k}" for k in ("training", "validation", "testing"))
    folds = f", fold {datalist['fold']} of {datalist['num_folds']}" if "num_folds" in datalist else ""
    print(f"{output}: {layout}, {counts}{folds}")


if __name__ == "__main__":
    run_cli(prepare_datalist)
