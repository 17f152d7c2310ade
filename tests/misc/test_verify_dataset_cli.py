"""Tests for tools/verify_dataset.py: output lines, JSON report and exit statuses 0 / 1 / 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.data.synthetic.defects import plant_defect
from common.data.synthetic.write import write_synthetic_dataset

TOOL = Path(__file__).resolve().parents[2] / "tools" / "verify_dataset.py"


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command line, from another folder and without PYTHONPATH, as a user runs it (once: ~7 s)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_problems_exit_1_with_every_problem_and_a_json_report(tmp_path):
    data = tmp_path / "data"
    cases = write_synthetic_dataset("brats2021", str(data), 4, (16, 16, 16), seed=0, progress=False)
    (nan,) = plant_defect("brats2021", str(data), cases[1], "nan")
    (labels,) = plant_defect("brats2021", str(data), cases[1], "bad_label_values")
    (gone,) = plant_defect("brats2021", str(data), cases[3], "missing_modality")
    report = tmp_path / "out" / "report.json"
    args = ("--layout", "brats2021", "--data_dir", str(data), "--output", str(report), "--progress", "false")
    result = run_tool(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{cases[1]}: {nan}: contains 5 NaN values",
        f"{cases[1]}: {labels}: unexpected label values [3] for brats2021 (expected 0, 1, 2, 4)",
        f"{cases[3]}: {gone}: missing {os.path.basename(gone)}",
        "3 problems found (2 of 4 cases affected)",
    ]
    saved = json.loads(report.read_text())
    assert saved["num_problems"] == 3 and saved["num_cases"] == 4
    assert [f"{p['case']}: {p['path']}: {p['problem']}" for p in saved["problems"]] == lines[:3]
    assert os.listdir(report.parent) == ["report.json"]  # written atomically: no temporary file left


def load_tool():
    spec = importlib.util.spec_from_file_location("verify_dataset_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clean_folder_exit_0_with_one_line(tmp_path, monkeypatch, capsys):
    write_synthetic_dataset("adni_pairs", str(tmp_path / "adni"), 3, (16, 16, 16), seed=0, progress=False)
    tool = load_tool()
    monkeypatch.chdir(tmp_path)  # a relative --data_dir
    monkeypatch.setattr(sys, "argv", ["verify_dataset", "--layout", "adni_pairs", "--data_dir", "adni"])
    tool.run_cli(tool.verify_dataset)  # returns: exit status 0
    assert capsys.readouterr().out == "3 cases checked, no problems\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layout", "brats2019", "--data_dir", "."], "error: --layout: unknown layout 'brats2019'; expected one of"),
        (["--layout", "mosmed", "--data_dir", "absent"], "error: absent: data folder not found"),
        (["--layout", "mosmed", "--data_dir", ".", "--progress", "maybe"], "error: --progress: expected true or false"),
    ],
)
def test_bad_command_line_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    tool = load_tool()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["verify_dataset", *args])
    with pytest.raises(SystemExit) as info:
        tool.run_cli(tool.verify_dataset)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and len(captured.err.strip().splitlines()) == 1 and not captured.out
