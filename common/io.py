"""Atomic file writing: outputs appear complete or not at all.

A killed run or a failed case must never leave a half-written NIfTI, CSV or checkpoint behind,
so every writer in the collection writes to a temporary file in the destination folder and
renames it into place (``os.replace`` is atomic on POSIX and Windows for same-volume paths).

A process killed with SIGKILL between creating the temporary file and renaming it leaves the temporary
file behind (nothing runs on SIGKILL); :func:`remove_partial_files` deletes such leftovers of one output.
Checkpoints use ``fsync=True`` so that a power loss right after the rename cannot leave an empty file
under the final name either.

A case with several outputs (MedSegDiff's mask, mean and uncertainty; DC2Fusion's fused volume and panel) is
written as a set inside :func:`file_set`: every file goes to its temporary name first, and only once all are
complete are they renamed into place, so a failure half-way leaves none of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import os
import tempfile
from collections.abc import Iterable, Iterator

#: the files of the innermost active :func:`file_set`: (temporary path, final path, fsync) in writing order
_FILE_SET: contextvars.ContextVar[list[tuple[str, str, bool]] | None] = contextvars.ContextVar(
    "common_io_file_set", default=None
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the full suffix (``.nii.gz``, ``.pt``) so writers that infer the
    format from the extension (nibabel, ITK, matplotlib) behave as for the final name; it is
    ``.<name>.<random>.partial-<name>`` (see :func:`partial_files`).

    Inside :func:`file_set` the rename waits for the end of the set.

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
        pending = _FILE_SET.get()
        if pending is not None:
            pending.append((tmp, path, fsync))
            return
        _replace(tmp, path, fsync)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _replace(tmp: str, path: str, fsync: bool) -> None:
    os.replace(tmp, path)
    if fsync and os.name == "posix":
        _fsync(os.path.dirname(os.path.abspath(path)))  # the rename is durable once the folder's entry is on disk


@contextlib.contextmanager
def file_set() -> Iterator[None]:
    """Files written through :func:`atomic_path` inside the block appear together when it ends, or none of them.

    Each file is written to its temporary name as usual, but its rename waits: when the block ends without error
    every file is renamed into place, in writing order (metadata-only renames, microseconds apart); when it raises
    (a writer fails, a transform between two writers fails), every temporary file is removed and no final name is
    touched. Should a rename itself fail, the files of the set already renamed are removed again, so that no part of
    the set is left. Only a SIGKILL during the renames can leave part of a set; the temporary files a kill leaves
    are removed when the same outputs are written again (:func:`remove_partial_files`). A block inside another
    joins the outer set.

    Why files renamed one by one rather than one folder renamed at once: the collection's outputs are files named
    ``<output_dir>/<case>_<postfix>``, side by side in one folder, as MONAI's writers and the Model Zoo name them.
    """
    if _FILE_SET.get() is not None:
        yield
        return
    pending: list[tuple[str, str, bool]] = []
    token = _FILE_SET.set(pending)
    try:
        yield
    except BaseException:
        _remove_all(tmp for tmp, _, _ in pending)
        raise
    finally:
        _FILE_SET.reset(token)
    renamed: list[str] = []
    try:
        for tmp, path, fsync in pending:
            _replace(tmp, path, fsync)
            renamed.append(path)
    except BaseException:
        _remove_all([tmp for tmp, _, _ in pending[len(renamed) :]] + renamed)
        raise


def _remove_all(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def partial_files(path: str | os.PathLike) -> list[str]:
    """The temporary files :func:`atomic_path` left next to ``path`` (a writer killed before its rename), sorted."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = glob.escape(os.path.basename(path))
    return sorted(glob.glob(os.path.join(glob.escape(folder), f".{base}.*.partial-{base}")))


def remove_partial_files(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files :func:`atomic_path` left next to ``path``; return those it deleted.

    Call it only when no other process is writing ``path``: a live writer's temporary file looks the same. The
    temporary files of this process's active :func:`file_set` are kept.
    """
    pending = {tmp for tmp, _, _ in _FILE_SET.get() or []}
    removed = []
    for tmp in partial_files(path):
        if tmp in pending:
            continue
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
