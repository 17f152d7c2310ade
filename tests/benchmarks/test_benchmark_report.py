"""Tests of common/benchmarks/report.py."""

from __future__ import annotations

import json
import os

from common.benchmarks.report import bundle_train_parser, write_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_write_report_prints_and_writes_both_files(tmp_path, capsys):
    results = {"dice": 0.5, "device": object()}
    json_path, md_path = write_report(str(tmp_path / "out"), "bench", results, "| a |\n| 1 |")
    assert json.load(open(json_path)) == {"dice": 0.5, "device": None}  # non-JSON values become null
    assert open(md_path).read() == "| a |\n| 1 |\n"
    assert "| a |" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["bench.json", "bench.md"]  # no temporary file left


def test_bundle_train_parser_points_the_bundle_config_at_the_data_and_overrides_win(tmp_path):
    bundle = os.path.join(REPO, "tests", "example_bundle")
    parser = bundle_train_parser(bundle, "/data", "/data/list.json", {"num_workers": 3, "epochs": 7})
    assert parser["dataset_dir"] == "/data" and parser["data_list_file_path"] == "/data/list.json"
    assert parser["bundle_root"] == bundle and parser["cache_rate"] == 1.0
    assert parser["num_workers"] == 3 and parser["epochs"] == 7
