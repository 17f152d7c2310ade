"""Shared pytest set-up: repository paths and a deterministic, quiet CPU environment."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

EXAMPLE_BUNDLE = os.path.join(REPO_ROOT, "tests", "example_bundle")


@pytest.fixture(autouse=True)
def _cpu_threads():
    """Two cores on CI: keep torch from oversubscribing them when tests spawn bundle subprocesses."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
