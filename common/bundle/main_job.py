"""The collection's main job: every bundle, on synthetic data, trained briefly, evaluated and run for inference.

For each bundle under ``bundles/`` (the example bundle in ``tests/`` when there is none yet) it writes the
bundle's synthetic dataset in its real public layout, builds the datalist, runs the bundle's stages from
``configs/pipeline.json`` with the ``demo`` profile (``python -m monai.bundle run ...`` subprocesses, exactly
as a user runs them), draws a PNG montage and ends with a summary table (bundle, status, each bundle's summary
metrics from its ``pipeline.json``, e.g. mean Dice and mean HD95 in mm, seconds), also written as ``summary.md``
and ``summary.json``. It uses CUDA when present.
"""

from __future__ import annotations

import glob
import json
import os
import time
import traceback
from collections.abc import Sequence

from common.bundle.montage import make_montage
from common.bundle.pipeline import BundleRunError, load_pipeline, run_pipeline
from common.io import atomic_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE_BUNDLE = os.path.join(REPO_ROOT, "tests", "example_bundle")


def discover_bundles(root: str = REPO_ROOT) -> list[str]:
    """Folders under ``bundles/`` holding ``configs/pipeline.json``; the example bundle if there are none."""
    found = sorted(
        os.path.dirname(os.path.dirname(p))
        for p in glob.glob(os.path.join(root, "bundles", "*", "configs", "pipeline.json"))
    )
    return found or [EXAMPLE_BUNDLE]


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of the rows: bundle, status, one column per summary metric of any row, seconds.

    A metric a bundle does not report (another bundle's) is left blank; ``n/a`` is a reported null.
    """
    names = list(dict.fromkeys(name for r in rows for name in r["metrics"]))
    lines = [
        "| " + " | ".join(["bundle", "status", *names, "seconds"]) + " |",
        "| " + " | ".join(["---", "---", *["---:"] * len(names), "---:"]) + " |",
    ]
    for r in rows:
        cells = [
            "" if n not in r["metrics"] else "n/a" if r["metrics"][n] is None else f"{r['metrics'][n]:.4f}"
            for n in names
        ]
        lines.append("| " + " | ".join([r["bundle"], r["status"], *cells, f"{r['seconds']:.1f}"]) + " |")
    return "\n".join(lines)


def run_main_job(
    bundles: Sequence[str] | None = None,
    work_dir: str = "runs/main",
    profile: str = "demo",
    device: str = "auto",
    verbose: bool = False,
) -> list[dict]:
    """Run every bundle end to end; return one summary row per bundle (a failed bundle does not stop the others).

    Args:
        bundles: bundle folders or names under ``bundles/``; default all.
        work_dir: where data, checkpoints, outputs, logs, montages and the summary go.
        profile: ``"demo"`` (default) or ``"test"`` (tiny, as in CI).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
        verbose: echo every stage's log while it runs.
    """
    device = resolve_device(device)
    work_dir = os.path.abspath(work_dir)
    paths = (
        [b if os.path.isdir(b) else os.path.join(REPO_ROOT, "bundles", b) for b in bundles]
        if bundles
        else discover_bundles()
    )
    rows = []
    print(f"main job: {len(paths)} bundle(s), profile {profile}, device {device}, output {work_dir}", flush=True)
    for i, bundle_dir in enumerate(paths, 1):
        name = os.path.basename(os.path.abspath(bundle_dir))
        print(f"[{i}/{len(paths)}] {name}: synthetic data, training, evaluation, inference ...", flush=True)
        start = time.perf_counter()
        row = {"bundle": name, "status": "ok", "metrics": {}, "seconds": 0.0, "montage": None}
        try:
            spec = load_pipeline(bundle_dir)
            result = run_pipeline(
                bundle_dir,
                os.path.join(work_dir, name),
                profile=profile,
                device=device,
                data_root=os.path.join(work_dir, "data"),
                echo=verbose,
            )
            for stage in result.stages:
                print(f"    {stage.name:<12} {stage.seconds:7.1f} s   log: {stage.log_file}", flush=True)
            row["metrics"] = result.metrics
            if spec.get("montage"):
                out_stage = spec["montage"].get("stage", "inference")
                row["montage"] = make_montage(
                    spec["montage"],
                    result.dataset_dir,
                    result.datalist,
                    os.path.join(result.work_dir, out_stage),
                    os.path.join(work_dir, f"{name}_montage.png"),
                    title=name,
                )
                print(f"    montage: {row['montage']}", flush=True)
        except (BundleRunError, FileNotFoundError, ValueError, KeyError, OSError) as err:
            row["status"] = "FAILED"
            print(f"    FAILED: {err}", flush=True)
            if verbose:
                traceback.print_exc()
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    table = format_table(rows)
    print("\n" + table, flush=True)
    with atomic_path(os.path.join(work_dir, "summary.md")) as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    with atomic_path(os.path.join(work_dir, "summary.json")) as tmp, open(tmp, "w") as f:
        json.dump({"device": device, "profile": profile, "bundles": rows}, f, indent=2)
    return rows
