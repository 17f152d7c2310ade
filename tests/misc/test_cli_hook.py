"""The data-error hook of bundle runs: one line and exit status 2 for bad input, a full traceback for bugs."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from common.cli import data_error_message, install_data_error_hook
from common.errors import DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        return err
    raise AssertionError("nothing raised")


def _monai_style():
    """What MONAI's ConfigExpression does with an error of a config expression."""
    try:
        raise DataError("/data/case_1/t1.nii.gz", "truncated gzip stream")
    except DataError as e:
        raise RuntimeError("Failed to evaluate ConfigExpression: $load()") from e


def _while_handling():
    try:
        raise DataError("/data/case_2/seg.nii.gz", "label values {7} not in {0, 1, 2, 4}")
    except DataError:
        raise KeyError("cleanup failed")  # noqa: B904 - an implicit __context__ is what is tested


def test_message_found_through_cause_and_context():
    assert data_error_message(_raised(_monai_style)) == "/data/case_1/t1.nii.gz: truncated gzip stream"
    assert (
        data_error_message(_raised(_while_handling)) == "/data/case_2/seg.nii.gz: label values {7} not in {0, 1, 2, 4}"
    )


def test_bugs_are_not_data_errors():
    assert data_error_message(_raised(lambda: 1 / 0)) is None
    assert data_error_message(RuntimeError("Failed to evaluate $x")) is None


class _BadCase(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        try:
            raise DataError(f"/data/case_{index}/flair.nii.gz", "contains NaN")
        except DataError as e:  # as MONAI's apply_transform wraps a transform's error
            raise RuntimeError("applying transform <LoadImaged>") from e


def test_message_found_in_dataloader_worker_reraise():
    loader = torch.utils.data.DataLoader(_BadCase(), batch_size=1, num_workers=1)
    err = _raised(lambda: next(iter(loader)))
    assert not isinstance(err, DataError) and "worker" in str(err)  # torch re-raises the traceback as text
    assert data_error_message(err) == "/data/case_0/flair.nii.gz: contains NaN"


@pytest.fixture
def hook_installed(monkeypatch):
    """Install the hook in this process and undo it afterwards (it changes process-wide state)."""
    factory = logging.getLogRecordFactory()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    install_data_error_hook()
    yield
    logging.setLogRecordFactory(factory)


def test_logged_data_error_loses_its_traceback_other_errors_keep_it(hook_installed):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test_cli_hook.records")
    logger.propagate = False
    handler = Keep()  # added after the hook: the hook does not depend on the logging configuration
    logger.addHandler(handler)
    try:
        for fn in (_monai_style, lambda: 1 / 0):
            try:
                fn()
            except Exception as e:
                logger.exception("Exception: %s", e)
    finally:
        logger.removeHandler(handler)
    data, bug = records
    assert data.exc_info is None and data.getMessage() == "data error: /data/case_1/t1.nii.gz: truncated gzip stream"
    assert bug.exc_info is not None and bug.exc_info[0] is ZeroDivisionError


def _run(body: str) -> subprocess.CompletedProcess:
    script = "from common.cli import install_data_error_hook\ninstall_data_error_hook()\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_uncaught_data_error_is_one_line_and_exit_status_2():
    proc = _run(
        """
        import logging, sys
        from common.errors import DataError
        logging.basicConfig(stream=sys.stdout)
        print("started")
        try:
            raise DataError("/data/BraTS2021_00001/BraTS2021_00001_t1.nii.gz", "not a NIfTI file")
        except DataError as e:
            logging.getLogger("monai").exception("Exception: %s", e)
            raise RuntimeError("Failed to evaluate $@evaluator.run()") from e
        """
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: /data/BraTS2021_00001/BraTS2021_00001_t1.nii.gz: not a NIfTI file\n"
    assert "started" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_multi_problem_data_error_prints_one_line_per_problem():
    proc = _run(
        """
        from common.errors import DataError
        raise DataError("/data/datalist.json", "2 bad cases:\\ncase_1: /d/a.nii.gz: NaN\\ncase_2: /d/b.nii.gz: truncated")
        """
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: /data/datalist.json: 2 bad cases:",
        "case_1: /d/a.nii.gz: NaN",
        "case_2: /d/b.nii.gz: truncated",
    ]


def test_bugs_keep_their_traceback_and_exit_status_1():
    proc = _run("raise ZeroDivisionError('a bug')\n")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):") and "ZeroDivisionError: a bug" in proc.stderr


def test_install_is_idempotent_and_chains_to_the_previous_hook(monkeypatch, hook_installed):
    calls = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args[0]))
    install_data_error_hook()
    first, factory = sys.excepthook, logging.getLogRecordFactory()
    install_data_error_hook()
    assert sys.excepthook is first and logging.getLogRecordFactory() is factory
    sys.excepthook(ValueError, ValueError("bug"), None)
    assert calls == [ValueError]
    with pytest.raises(SystemExit) as exit_info:
        sys.excepthook(RuntimeError, _raised(_monai_style), None)
    assert exit_info.value.code == 2
