"""Shared entry point for the thin command lines in ``tools/``.

``fire`` turns a function into a command line; this wrapper adds what users of a data tool expect:
a :class:`~common.errors.DataError` is printed as one line naming the file and the problem, with
exit status 2 and no traceback. Any other exception keeps its traceback (it is a bug, not bad data).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import fire

from common.errors import DataError


def run_cli(component: Callable[..., Any] | dict[str, Callable[..., Any]], name: str | None = None) -> None:
    """Run ``component`` with ``fire``; turn data errors into a one-line message and exit status 2."""
    try:
        fire.Fire(component, name=name, serialize=lambda result: None)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
