"""Shared entry points: the thin command lines in ``tools/`` and the bundles' ``monai.bundle run`` processes.

A :class:`~common.errors.DataError` is bad input, not a bug: users expect one line naming the file and the
problem, with exit status 2 and no traceback. Any other exception keeps its traceback (it is a bug).

- :func:`run_cli` wraps a ``fire`` command line in ``tools/``.
- :func:`install_data_error_hook` does the same for ``python -m monai.bundle run``, where the error cannot be
  caught around the call: MONAI re-raises errors of config expressions and components as
  ``RuntimeError("Failed to evaluate ...")`` chained ``from`` the original, MONAI transforms wrap them in
  ``RuntimeError("applying transform ...")``, and PyTorch re-raises an error of a ``DataLoader`` worker as a
  new exception whose message is the worker's formatted traceback. The hook finds the data error in the
  ``__cause__``/``__context__`` chain, or in that text.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

import fire

from common.errors import DataError

__all__ = ["data_error_message", "install_data_error_hook", "run_cli"]

#: exit status of a run stopped by bad input (argparse and fire use 2 for bad usage, too)
DATA_ERROR_EXIT_CODE = 2

# "common.errors.DataError: <path>: <problem>" as traceback.format_exception writes it (the class is not a
# builtin, so its module is printed); the message runs until the blank line that ends the exception block.
_DATA_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?DataError: (?P<message>.+?)(?=\n\n|\n?\Z)", re.M | re.S)


def run_cli(component: Callable[..., Any] | dict[str, Callable[..., Any]], name: str | None = None) -> None:
    """Run ``component`` with ``fire``; turn data errors into a one-line message and exit status 2."""
    try:
        fire.Fire(component, name=name, serialize=lambda result: None)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(DATA_ERROR_EXIT_CODE)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling, outermost first (cycles cut)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


def data_error_message(exc: BaseException) -> str | None:
    """The ``"<path>: <problem>"`` text of the data error behind ``exc``, or ``None`` when ``exc`` is a bug.

    Looks at ``exc`` and its ``__cause__``/``__context__`` chain, first for a :class:`DataError` object, then
    (for errors re-raised from ``DataLoader`` worker processes, which only carry the worker's traceback as
    text) for a ``DataError: ...`` line in the exceptions' messages.
    """
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, DataError):
            return str(e)
    for e in chain:
        match = _DATA_ERROR_LINE.search(str(e))
        if match:
            return match.group("message").strip()
    return None


def _one_line_log_record(record: logging.LogRecord) -> logging.LogRecord:
    """Drop the traceback from a log record about a data error, keeping one line naming file and problem.

    MONAI's ``StatsHandler`` logs every exception of an engine run with ``logger.exception`` (a full
    traceback) before re-raising it; for bad input that is the traceback soup this collection promises not
    to print. Records about other exceptions pass unchanged.
    """
    if record.exc_info and record.exc_info[1] is not None:
        message = data_error_message(record.exc_info[1])
        if message is not None:
            record.msg, record.args = f"data error: {message}", ()
            record.exc_info, record.exc_text = None, None
    return record


def _data_error_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, previous: Callable[..., Any]
) -> None:
    message = data_error_message(exc) if isinstance(exc, Exception) else None
    if message is None:
        previous(exc_type, exc, tb)
        return
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(DATA_ERROR_EXIT_CODE)  # honoured from inside sys.excepthook: the process exits with this status


def install_data_error_hook() -> None:
    """Make an uncaught data error end the process with ``error: <file>: <problem>`` on stderr and status 2.

    Installs a ``sys.excepthook`` (other exceptions still go to the previous hook: a normal traceback) and a
    log record factory that turns a logged data error (``logger.exception``) into one line without traceback,
    whichever logging configuration is applied before or after. Idempotent.

    Bundles call it as the first ``initialize`` expression, which ``monai.bundle run`` evaluates before any
    other part of the config::

        "imports": ["$from common.cli import install_data_error_hook", ...],
        "initialize": ["$install_data_error_hook()", ...]
    """
    current = sys.excepthook
    if not getattr(current, "_data_error_hook", False):

        def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
            _data_error_excepthook(exc_type, exc, tb, current)

        hook._data_error_hook = True  # type: ignore[attr-defined]
        sys.excepthook = hook
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_data_error_hook", False):

        def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return _one_line_log_record(factory(*args, **kwargs))

        make_record._data_error_hook = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(make_record)
