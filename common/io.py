"""Atomic file writing: outputs appear complete or not at all.

A killed run or a failed case must never leave a half-written NIfTI, CSV or checkpoint behind,
so every writer in the collection writes to a temporary file in the destination folder and
renames it into place (``os.replace`` is atomic on POSIX and Windows for same-volume paths).

A process killed with SIGKILL between creating the temporary file and renaming it leaves the temporary
file behind (nothing runs on SIGKILL); :func:`remove_partial_files` deletes such leftovers of one output.
Checkpoints use ``fsync=True`` so that a power loss right after the rename cannot leave an empty file
under the final name either.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the full suffix (``.nii.gz``, ``.pt``) so writers that infer the
    format from the extension (nibabel, ITK, matplotlib) behave as for the final name; it is
    ``.<name>.<random>.partial-<name>`` (see :func:`partial_files`).

    Args:
        path: the final file.
        fsync: flush the temporary file to disk before the rename and the folder's entry after it, so the
            file is durable, not only complete (costs a disk sync; used for checkpoints).
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
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync and os.name == "posix":
            _fsync(folder)  # the rename itself is durable only once the folder's entry is on disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def partial_files(path: str | os.PathLike) -> list[str]:
    """The temporary files :func:`atomic_path` left next to ``path`` (a writer killed before its rename), sorted."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = glob.escape(os.path.basename(path))
    return sorted(glob.glob(os.path.join(glob.escape(folder), f".{base}.*.partial-{base}")))


def remove_partial_files(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files :func:`atomic_path` left next to ``path``; return those it deleted.

    Call it only when no other process is writing ``path``: a live writer's temporary file looks the same.
    """
    removed = []
    for tmp in partial_files(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
            removed.append(tmp)
    return removed


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
