"""Package a bundle as a self-contained MONAI Model Zoo zip (its code from ``common`` vendored as ``scripts/``).

Example::

    python tools/package_bundle.py --name brats_mri_hlwa_segmentation --output_dir dist
    # -> dist/brats_mri_hlwa_segmentation_v0.1.0.zip; serve it anywhere, then
    python -m monai.bundle download --name brats_mri_hlwa_segmentation --url <url of the zip> --bundle_dir <dir>

Prints the path of the zip. A bad bundle (unknown name, version not in the changelog, a model file too large
for the zip and not in ``large_files.yml``) gives one line naming the file, exit status 2 and no zip.
See ``common/bundle/package.py`` for the layout.
"""

from __future__ import annotations

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.bundle.package import BUNDLES_ROOT, MAX_FILE_MB, package_bundle
from common.cli import run_cli


def main(name: str, output_dir: str, bundles_root: str = BUNDLES_ROOT, max_file_mb: float = MAX_FILE_MB) -> None:
    """Write OUTPUT_DIR/NAME_v<version>.zip from BUNDLES_ROOT/NAME and print its path."""
    print(package_bundle(str(name), str(output_dir), bundles_root=str(bundles_root), max_file_mb=float(max_file_mb)))


if __name__ == "__main__":
    run_cli(main)
