#!/usr/bin/env python3
"""Export a bundle's trained network with ``torch.export`` to an ExportedProgram (``.pt2``).

    python tools/export_bundle.py --bundle_dir bundles/brats_mri_hlwa_segmentation --ckpt_file models/model.pt \
        --filepath models/model.pt2 [--input_shape "[1, 4, 128, 128, 128]"] [--network_def#features "[...]"]

Further ``--key value`` pairs are config overrides that make the inference config's ``network_def`` match the
checkpoint. Load with ``torch.export.load("model.pt2").module()``. See ``common.bundle.export``.
"""

import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.bundle.export import export_bundle  # noqa: E402
from common.cli import run_cli  # noqa: E402


def main(bundle_dir: str, ckpt_file: str, filepath: str, input_shape=None, **overrides) -> None:
    print(f"wrote {export_bundle(bundle_dir, ckpt_file, filepath, input_shape, overrides)}")


if __name__ == "__main__":
    run_cli(main)
