"""Atomic file writing: outputs appear complete or not at all.

A killed run or a failed case must never leave a half-written NIfTI, CSV or checkpoint behind,
so every writer in the collection writes to a temporary file in the destination folder and
renames it into place (``os.replace`` is atomic on POSIX and Windows for same-volume paths).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the full suffix (``.nii.gz``, ``.pt``) so writers that infer the
    format from the extension (nibabel, ITK, matplotlib) behave as for the final name.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial-" + base, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
