"""Check a dataset folder in one of the supported layouts: every file of every case, every problem in one pass.

Example::

    python tools/verify_dataset.py --layout brats2021 --data_dir /data/BraTS2021 [--output report.json] \\
        [--num_workers 8] [--progress false] [--verbose true]

Layouts: brats2021, brats2023, msd_task01, mosmed, adni_pairs, and any registered later (``common/data/layouts/``;
see ``common/data/integrity.py`` for what is checked). Output: ``N cases checked, no problems`` and exit status 0
for a clean folder; otherwise one ``case: file: problem`` line per problem, then a count, and exit status 1. A bad
command line (unknown layout, missing folder) prints one ``error:`` line and exits with status 2. ``--output``
writes the report as JSON (also when clean). ``--verbose true`` logs benign notes (orientation, anisotropy) on stderr.
"""

from __future__ import annotations

import logging
import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import run_cli
from common.data.integrity import DATASET, dataset_report
from common.data.layouts import layout_names
from common.errors import DataError

_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _boolean(option: str, value: bool | int | str) -> bool:
    """fire gives ``--progress false`` as the string ``"false"``: read the usual spellings of a boolean."""
    try:
        return _BOOLEANS[str(value).strip().lower()]
    except KeyError:
        raise DataError(f"--{option}", f"expected true or false, got {value!r}") from None


def verify_dataset(
    layout: str,
    data_dir: str,
    output: str | None = None,
    num_workers: int | None = None,
    progress: bool | str = True,
    verbose: bool | str = False,
) -> None:
    """Check every case of DATA_DIR in LAYOUT; print the problems; exit 1 if there are any."""
    if str(layout) not in layout_names():
        raise DataError("--layout", f"unknown layout {layout!r}; expected one of {', '.join(layout_names())}")
    if _boolean("verbose", verbose):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logging.getLogger("common.data.integrity").setLevel(logging.DEBUG)  # the benign per-case notes
    workers = None if num_workers is None else int(num_workers)
    report = dataset_report(str(layout), str(data_dir), num_workers=workers, progress=_boolean("progress", progress))
    if output is not None:
        report.save(str(output))
    if not report.problems:
        print(f"{report.num_cases} cases checked, no problems")
        return
    for problem in report.problems:
        print(problem)
    affected = len({p.case for p in report.problems if p.case != DATASET})
    count = len(report.problems)
    print(f"{count} problem{'s' if count != 1 else ''} found ({affected} of {report.num_cases} cases affected)")
    sys.stdout.flush()
    sys.exit(1)


if __name__ == "__main__":
    run_cli(verify_dataset)
