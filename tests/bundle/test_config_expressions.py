"""Bundle configs keep `$` expressions to a call: no conditionals, loops, lambdas or slicing (issue 17.2).

Logic lives in named, tested functions in ``common`` (e.g. ``default_device()``, ``rank_zero_handlers(...)``,
``require_valid_datalist(..., missing_ok=True)``), so configs read like the MONAI Model Zoo's.
"""

import glob
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(
    glob.glob(os.path.join(REPO, "bundles", "*", "configs", "*.json"))
    + glob.glob(os.path.join(REPO, "tests", "example_bundle", "configs", "*.json"))
)
LOGIC = re.compile(r"\bif\b|\bfor\b|\blambda\b|\[[^\]]*:[^\]]*\]")


def expressions(value, key=""):
    """``(config id, expression)`` of every ``$`` string in a parsed config, imports excepted."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from expressions(v, f"{key}#{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from expressions(v, f"{key}#{i}")
    elif isinstance(value, str) and value.startswith("$") and not value.startswith(("$import", "$from")):
        yield key, value


def test_the_scan_finds_logic():
    config = {"a": "$x if @y else None", "b": ["$[d for d in @l]"], "c": "$lambda x: x", "d": "$@roi[1:]"}
    assert [k for k, e in expressions(config) if LOGIC.search(e)] == ["a", "b#0", "c", "d"]
    assert not [k for k, e in expressions({"e": "$default_device()", "f": "$@a + 1"}) if LOGIC.search(e)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_expressions_are_calls(path):
    with open(path) as f:
        config = json.load(f)
    logic = [f"{key}: {expr}" for key, expr in expressions(config) if LOGIC.search(expr)]
    assert not logic, "logic in $ expressions (move it into a named function in common):\n" + "\n".join(logic)
