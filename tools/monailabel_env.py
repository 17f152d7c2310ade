#!/usr/bin/env python3
"""Create (or reuse) ``.venv-monailabel``: a separate environment for MONAI Label's ``monaibundle`` app.

    python3 tools/monailabel_env.py            # create or update the environment, then print its python
    python3 tools/monailabel_env.py --check    # exit 0 if it is up to date, 1 if not (installs nothing)

MONAI Label 0.8.5 needs numpy < 2 and a torchvision whose compiled operators match torch (with the project's
torch 2.13 its server fails to load ``torchvision::nms``), so it cannot share ``.venv``. Standard library only,
like ``tools/dev.py``: it runs before anything is installed. The environment lives in the checkout; a stamp file
records what was installed, and a rerun installs nothing unless the package list below (or one of the
bundles' ``configs/metadata.json``, whose ``required_packages_version`` names the bundles' own dependencies)
changed.

What is installed, in two pip calls (about 3 minutes and 8 GB, most of it the CUDA build of torch, which also
runs on the CPU):

1. ``MONAILABEL_TORCH_SPEC`` (default ``torch==2.14.1 torchvision==0.29.1``);
2. ``monai==1.6.1 monailabel==0.8.5 "pydicom<3" dicomweb-client==0.59.1 "numpy<2"`` plus every package the
   segmentation bundles' metadata names, unpinned so that pip picks releases that work with numpy < 2.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-monailabel")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python.exe" if os.name == "nt" else "python")
STAMP = os.path.join(VENV, ".installed")
TORCH_SPEC = "torch==2.14.1 torchvision==0.29.1"
MONAILABEL_SPEC = ["monai==1.6.1", "monailabel==0.8.5", "pydicom<3", "dicomweb-client==0.59.1", "numpy<2"]
# metadata names that are already covered by MONAILABEL_SPEC or need no separate install
_SKIP = {"monai", "torch", "numpy"}


def _say(msg: str) -> None:
    print(f"[monailabel-env] {msg}", flush=True)


def _run(cmd: list[str]) -> None:
    _say("$ " + shlex.join(cmd))
    start = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    _say(f"done in {time.monotonic() - start:.0f} s")


def bundle_packages() -> list[str]:
    """The distribution names listed in every bundle's ``required_packages_version``/``optional_packages_version``."""
    names: set[str] = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "bundles", "*", "configs", "metadata.json"))):
        with open(path) as f:
            meta = json.load(f)
        for key in ("required_packages_version", "optional_packages_version"):
            names.update(str(n).lower() for n in (meta.get(key) or {}))
    return sorted(names - _SKIP)


def wanted_specs() -> tuple[list[str], list[str]]:
    """The two pip install argument lists: torch first, then MONAI Label and the bundles' dependencies."""
    torch = shlex.split(os.environ.get("MONAILABEL_TORCH_SPEC", TORCH_SPEC))
    return torch, MONAILABEL_SPEC + bundle_packages()


def _fingerprint(torch: list[str], rest: list[str]) -> str:
    return hashlib.sha256(json.dumps([torch, rest]).encode()).hexdigest()


def is_up_to_date() -> bool:
    """True when the environment exists and its stamp matches the current package lists."""
    if not (os.path.isfile(PY) and os.path.isfile(STAMP)):
        return False
    with open(STAMP) as f:
        return f.read().strip() == _fingerprint(*wanted_specs())


def ensure_env() -> str:
    """Create ``.venv-monailabel`` if needed and install MONAI Label into it; returns its python."""
    if sys.version_info < (3, 10):  # noqa: UP036 - this script is what tells a user their Python is too old
        sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    torch, rest = wanted_specs()
    if is_up_to_date():
        _say(f"environment up to date: {VENV}")
        return PY
    if not os.path.isfile(PY):
        _say(f"creating virtual environment {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    if os.path.isfile(STAMP):
        os.remove(STAMP)
    _say("step 1/2: PyTorch")
    _run([PY, "-m", "pip", "install", "-q", *torch])
    _say("step 2/2: MONAI Label and the bundles' dependencies")
    _run([PY, "-m", "pip", "install", "-q", *rest])
    # a failing import here is a broken install: better to stop now than when the server starts
    _run([PY, "-c", "import monailabel, torchvision.ops, numpy; assert int(numpy.__version__.split('.')[0]) < 2"])
    tmp = STAMP + ".tmp"
    with open(tmp, "w") as f:
        f.write(_fingerprint(torch, rest) + "\n")
    os.replace(tmp, STAMP)
    _say(f"environment ready: {PY}")
    return PY


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv == ["--check"]:
        ok = is_up_to_date()
        _say("up to date" if ok else "missing or out of date")
        return 0 if ok else 1
    if argv:
        print(__doc__)
        return 2
    ensure_env()
    print(PY)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
