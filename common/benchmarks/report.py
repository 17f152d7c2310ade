"""What every benchmark of the collection shares: the bundle's own training config, and the report files.

A benchmark measures a bundle as it ships, so it reads that bundle's ``configs/train.json`` (network, loss,
transforms) rather than a copy; :func:`bundle_train_parser` points it at the benchmark's data.
:func:`write_report` prints the Markdown table and writes it, with the figures as JSON, atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from common.io import atomic_path

__all__ = ["bundle_train_parser", "write_report"]


def bundle_train_parser(
    bundle_dir: str,
    dataset_dir: str,
    datalist: str,
    overrides: dict[str, Any] | None = None,
    config: str = "train.json",
):
    """MONAI ``ConfigParser`` of ``bundle_dir/configs/<config>`` (default ``train.json``) with the data paths,
    ``num_workers=0``, ``cache_rate=1.0`` and ``overrides`` (which win) applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", config))
    parser.update(
        {
            "bundle_root": bundle_dir,
            "dataset_dir": dataset_dir,
            "data_list_file_path": datalist,
            "num_workers": 0,
            "cache_rate": 1.0,
            **(overrides or {}),
        }
    )
    return parser


def write_report(work_dir: str, name: str, results: dict[str, Any], table: str) -> tuple[str, str]:
    """Print ``table`` and write ``work_dir/<name>.json`` (``results``; non-JSON values become null) and
    ``work_dir/<name>.md`` (``table``), each atomically. Returns the two paths."""
    print("\n" + table, flush=True)
    os.makedirs(work_dir, exist_ok=True)
    json_path, md_path = os.path.join(work_dir, f"{name}.json"), os.path.join(work_dir, f"{name}.md")
    with atomic_path(json_path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=lambda v: None)
    with atomic_path(md_path) as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    return json_path, md_path


def model_names(models: str | Sequence[str], known: Iterable[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; ``ValueError`` on a name not in ``known`` or a repeated one."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if str(m).strip()]
    known = set(known)
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: choose from {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a model is listed twice: {names}")
    return names
