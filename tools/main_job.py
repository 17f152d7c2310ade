#!/usr/bin/env python3
"""The main job: every bundle on synthetic data, trained briefly, evaluated, inferred; a summary table.

    python tools/main_job.py [--bundles NAME[,NAME]] [--work_dir runs/main] [--profile demo|test]
                             [--device auto|cpu|cuda] [--verbose]

Exit status 1 if any bundle failed. See ``common.bundle.main_job``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.bundle.main_job import run_main_job  # noqa: E402
from common.cli import run_cli  # noqa: E402


def main(
    bundles=None, work_dir: str = "runs/main", profile: str = "demo", device: str = "auto", verbose: bool = False
) -> None:
    if isinstance(bundles, str):
        bundles = [b for b in bundles.split(",") if b]
    rows = run_main_job(bundles, work_dir=work_dir, profile=profile, device=device, verbose=verbose)
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
