"""Errors that name the file (or case) and the problem, so a user can fix their data in one pass."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data: a truncated or unreadable file, a missing modality, a wrong shape, NaNs, ...

    ``str(err)`` is one line, ``"<path>: <problem>"``, suitable for printing without a traceback.

    Args:
        path: the offending file or folder (or a case id when no single file is to blame).
        problem: what is wrong, in words a user understands.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
