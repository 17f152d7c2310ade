#!/usr/bin/env python3
"""The README's two commands: set up ``.venv`` and run the main job, or run the tests.

    python3 tools/dev.py main   # create/reuse .venv, install, run the main job on every bundle
    python3 tools/dev.py test   # create/reuse .venv, install with the dev extra, run pytest

Standard library only, because it runs before anything is installed. The virtual environment lives in the
checkout (``.venv``); both commands install the same thing (the project, editable, with its ``dev`` extra), and installation is skipped on
a rerun unless ``setup.cfg`` or ``pyproject.toml`` changed.
PyTorch: if the environment has no torch yet, ``TORCH_SPEC`` (default ``torch==2.13.0``) is installed first,
so pip does not pick the newest build; set ``TORCH_SPEC="torch --index-url ..."`` for a specific CUDA build.
Extra arguments after ``main`` go to ``tools/main_job.py``; after ``test``, to pytest.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python.exe" if os.name == "nt" else "python")
STAMP = os.path.join(VENV, ".installed")


def _say(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def _run(cmd: list[str]) -> None:
    _say("$ " + shlex.join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def _fingerprint(extras: str) -> str:
    h = hashlib.sha256(extras.encode())
    for name in ("setup.cfg", "pyproject.toml"):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    h.update(os.environ.get("TORCH_SPEC", "").encode())
    return h.hexdigest()


def ensure_env(extras: str = "dev") -> None:
    """Create ``.venv`` if needed and install the project (editable) with ``extras``; quick when up to date."""
    if sys.version_info < (3, 10):  # noqa: UP036 - this script is what tells a user their Python is too old
        sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    if not os.path.isfile(PY):
        _say(f"creating virtual environment {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = _fingerprint(extras)
    if os.path.isfile(STAMP) and open(STAMP).read().strip() == wanted:
        _say("environment up to date")
        return
    has_torch = subprocess.run([PY, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        _run([PY, "-m", "pip", "install", "-q", *shlex.split(os.environ.get("TORCH_SPEC", "torch==2.13.0"))])
    target = "." + (f"[{extras}]" if extras else "")
    _run([PY, "-m", "pip", "install", "-q", "-e", target])
    with open(STAMP, "w") as f:
        f.write(wanted + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("main", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "main":
        ensure_env()
        return subprocess.run([PY, os.path.join(ROOT, "tools", "main_job.py"), *rest], cwd=ROOT).returncode
    ensure_env()
    return subprocess.run([PY, "-m", "pytest", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
