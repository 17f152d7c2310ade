"""A whole-collection check on one machine (``tools/gpu_check.sh``): the environment, every bundle's training for a
few iterations with AMP, inference on a full-size volume, and the speed benchmark, in one report.

Written for a CUDA machine that has no internet (nothing is installed; what is missing is reported), and runnable on
the CPU with tiny sizes (``device="cpu", tiny=True``), which is how it is tested. Steps:

1. :func:`check_environment`: Python, every requirement of ``setup.cfg`` (``install_requires`` and the ``dev``
   extra) against what is installed, and torch / CUDA / GPU facts. Standard library only until torch is known to
   be there, so that a broken environment is reported rather than crashing.
2. For each bundle, in parallel (one thread each; the stages are ``python -m monai.bundle run`` subprocesses):
   its training stages with ``amp=True`` on the pipeline's ``demo`` sizes (``test`` when tiny) for one epoch (the
   test profile's schedule), then its inference stage on the same data and on a full-size synthetic volume of its
   layout (its ``synthetic_shape`` in :mod:`common.data.layouts`, written while the bundles train), the outputs
   checked against the inputs' shape and affine (:func:`common.bundle.checks.check_inference_outputs`).
3. :func:`common.benchmarks.speed.run_benchmark` on ``benchmark_networks`` with ``benchmark_switches``.
4. ``<out_dir>/gpu_check.md`` and ``gpu_check.json``: everything above, failures with the end of their logs.
"""

from __future__ import annotations

import configparser
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["check_environment", "run_device_check"]


def _requirements(setup_cfg: str) -> list[tuple[str, bool]]:
    """``(requirement, needed)``: ``install_requires`` (needed) and the ``dev`` extra (reported only)."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    out = []
    for section, key, needed in (("options", "install_requires", True), ("options.extras_require", "dev", False)):
        lines = cfg.get(section, key, fallback="").splitlines()
        out += [(line.strip(), needed) for line in lines if line.strip() and not line.strip().startswith("#")]
    return out


def check_environment(setup_cfg: str = os.path.join(REPO, "setup.cfg")) -> dict[str, Any]:
    """What the repository needs against what this Python has: ``{"python", "platform", "packages": [{"name",
    "required", "installed", "ok", "needed"}], "missing": [...], "missing_dev": [...], "torch": {...}}``.

    ``missing`` lists the unmet ``install_requires`` (the check cannot run without them), ``missing_dev`` the
    unmet requirements of the ``dev`` extra (tests and export tools; reported, not needed here)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # then only presence is checked
        Requirement = None  # noqa: N806
    packages, missing, missing_dev = [], [], []
    for line, needed in _requirements(setup_cfg):
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        ok = installed is not None
        if ok and Requirement is not None:
            ok = Requirement(line).specifier.contains(installed, prereleases=True)
        packages.append({"name": name, "required": line, "installed": installed, "ok": ok, "needed": needed})
        if not ok:
            (missing if needed else missing_dev).append(
                line if installed is None else f"{line} (installed {installed})"
            )
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": packages,
        "missing": missing,
        "missing_dev": missing_dev,
    }
    try:
        import torch
    except ImportError as err:
        env["torch"] = {"error": str(err)}
        return env
    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda}
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )
    env["torch"] = info
    return env


def _write_full_dataset(layout: str, folder: str, num_cases: int, shape: list[int] | None) -> tuple[str, str]:
    """Synthetic full-size cases of ``layout`` and a datalist with half of them under ``testing`` (in a worker);
    returns ``(dataset folder, datalist)``."""
    from common.data.datalist import build_datalist, save_datalist
    from common.data.synthetic.write import write_synthetic_dataset

    if not os.path.isfile(os.path.join(folder, ".complete")):
        write_synthetic_dataset(layout, folder, num_cases=num_cases, shape=shape, seed=1, progress=False)
        open(os.path.join(folder, ".complete"), "w").close()
    datalist = folder + "_datalist.json"
    save_datalist(build_datalist(layout, folder, seed=0, val_fraction=0.0, test_fraction=0.5, progress=False), datalist)
    return folder, datalist


def _full_cases(data: dict[str, Any], tiny: bool, full_shape: tuple[int, ...]) -> int:
    """Cases of the full-size dataset: the test profile's count (a MosMed split needs studies of several
    categories to hold one with a mask), but 2 (one to test) of volumes as large as BraTS', which take about
    40 s each to synthesise."""
    cases = max(2, int(data["test"]["num_cases"]))
    return 2 if not tiny and full_shape[0] * full_shape[1] * full_shape[2] > 4_000_000 else cases


def _check_bundle(bundle_dir: str, work: str, device: str, profile: str, data: Future, full: Future) -> dict[str, Any]:
    """Train with AMP, infer on the pipeline's data and on the full-size volume; one row per stage. ``data`` and
    ``full`` give ``(dataset folder, datalist)`` of the two datasets (written in worker processes)."""
    from common.bundle.checks import check_inference_outputs
    from common.bundle.pipeline import PipelineResult, load_pipeline, run_stage, stage_overrides, stage_run_overrides

    name = os.path.basename(bundle_dir)
    spec = load_pipeline(bundle_dir)
    rows: list[dict[str, Any]] = []
    dataset_dir, datalist = data.result()
    ckpt_dir = os.path.join(work, "checkpoints")
    # (stage, its dataset (None: the full-size one), the folder that holds its output folder, label)
    runs = [(s, (dataset_dir, datalist), work, s["name"]) for s in spec["stages"] if s["name"] != "evaluate"]
    inference = next(s for s in spec["stages"] if s["name"] == "inference")
    runs.append((inference, None, os.path.join(work, "full_volume"), "inference_full_volume"))
    for stage, source, base, label in runs:
        row: dict[str, Any] = {"bundle": name, "stage": label, "status": "ok"}
        t0 = time.perf_counter()
        try:
            data_dir, data_list = source if source is not None else full.result()  # written meanwhile
            out_dir = os.path.join(base, stage["name"])
            overrides = stage_run_overrides(stage, profile, data_dir, data_list, out_dir, ckpt_dir, device)
            if stage.get("trains"):  # one epoch, validated: the test profile's schedule
                test = stage_overrides(stage, "test")
                overrides.update({k: test[k] for k in ("epochs", "val_interval") if k in test})
            overrides["amp"] = True
            run_stage(bundle_dir, stage, overrides, os.path.join(work, "logs", f"{label}.log"), timeout=1800)
            if stage is inference:  # outputs on the input's grid: <base>/inference/<case>_...
                result = PipelineResult(name, data_dir, data_list, base)
                row["outputs_checked"] = len(check_inference_outputs(bundle_dir, result))
        except Exception as err:  # reported, the next stage and bundle still run
            row.update(status="FAILED", error=f"{type(err).__name__}: {err}"[-3000:])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[{name}] {label}: {row['status']} in {row['seconds']:.0f} s", flush=True)
        if row["status"] != "ok" and stage.get("trains"):
            break  # later stages need this checkpoint
    return {"bundle": name, "rows": rows}


def _format(report: dict[str, Any]) -> str:
    env = report["environment"]
    torch_info = env.get("torch", {})
    lines = [
        f"# Device check ({report['device']}{', tiny sizes' if report['tiny'] else ''})",
        "",
        f"Python {env['python']} ({env['executable']}), {env['platform']}; torch {torch_info.get('version')} "
        f"(CUDA build {torch_info.get('cuda_build')}); CUDA available: {torch_info.get('cuda_available')}"
        + (
            f"; {torch_info['device']} (capability {torch_info['capability']}, {torch_info['memory_gb']} GB, "
            f"bf16 {torch_info['bf16']}, cuDNN {torch_info['cudnn']})"
            if "device" in torch_info
            else ""
        ),
        "",
        "Missing or mismatched requirements: "
        + (", ".join(env["missing"]) if env["missing"] else "none")
        + "; of the dev extra (not needed here): "
        + (", ".join(env["missing_dev"]) if env["missing_dev"] else "none"),
        "",
        f"Total {report['seconds']:.0f} s. Bundles (training with AMP for one epoch, inference on the pipeline's data "
        "and on a full-size volume):",
        "",
        "| bundle | stage | status | seconds | outputs checked |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    failures = []
    for bundle in report["bundles"]:
        for r in bundle["rows"]:
            lines.append(
                f"| {r['bundle']} | {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r.get('outputs_checked', '')} |"
            )
            if r["status"] != "ok":
                failures.append(f"### {r['bundle']} / {r['stage']}\n\n```\n{r['error']}\n```")
    if report.get("benchmark_table"):
        lines += ["", "## Speed benchmark", "", report["benchmark_table"]]
    elif report.get("benchmark_error"):
        lines += ["", "## Speed benchmark", "", f"FAILED: {report['benchmark_error']}"]
    if failures:
        lines += ["", "## Failures", ""] + failures
    return "\n".join(lines) + "\n"


def run_device_check(
    out_dir: str,
    device: str = "cuda",
    tiny: bool = False,
    bundles: list[str] | None = None,
    benchmark: bool = True,
    benchmark_networks: str | None = None,
    benchmark_switches: str | None = None,
    benchmark_repeats: int = 2,
) -> dict[str, Any]:
    """Run the check (see the module docstring) and write ``<out_dir>/gpu_check.{md,json}``; returns the report.

    Args:
        out_dir: where the report, the bundles' runs and the benchmark go.
        device: ``"cuda"`` or ``"cpu"``.
        tiny: the pipelines' ``test`` sizes, a full-size volume of the ``test`` shape, a small benchmark.
        bundles: bundle names (default: every bundle).
        benchmark: run the speed benchmark.
        benchmark_networks, benchmark_switches: subsets (``"a,b"``); default all networks with ``sdpa,bf16,fp16``
            on CUDA (``sdpa,bf16`` on the CPU), and HLWA-UNet on the brain crop with ``sdpa,bf16`` when tiny.
        benchmark_repeats: timed repeats per benchmark measurement.
    """
    from common.benchmarks.speed import NETWORKS, run_benchmark
    from common.bundle.main_job import discover_bundles
    from common.bundle.pipeline import load_pipeline, prepare_data
    from common.data.layouts import get_layout
    from common.io import atomic_path

    start = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    profile = "test" if tiny else "demo"
    report: dict[str, Any] = {"device": device, "tiny": tiny, "environment": check_environment(), "bundles": []}
    paths = [p for p in discover_bundles() if bundles is None or os.path.basename(p) in bundles]
    data_specs = {load_pipeline(p)["data"]["layout"]: load_pipeline(p)["data"] for p in paths}
    work = {p: os.path.join(out_dir, "bundles", os.path.basename(p)) for p in paths}
    with ProcessPoolExecutor(len(paths) + len(data_specs)) as writers, ThreadPoolExecutor(len(paths)) as pool:
        data = {p: writers.submit(prepare_data, p, os.path.join(work[p], "data"), profile) for p in paths}
        full = {
            layout: writers.submit(
                _write_full_dataset,
                layout,
                os.path.join(out_dir, "full_data", layout),
                _full_cases(data, tiny, get_layout(layout).synthetic_shape),
                list(data["test"]["shape"]) if tiny else list(get_layout(layout).synthetic_shape),
            )
            for layout, data in data_specs.items()
        }
        jobs = [
            pool.submit(_check_bundle, p, work[p], device, profile, data[p], full[load_pipeline(p)["data"]["layout"]])
            for p in paths
        ]
        for p, job in zip(paths, jobs):
            try:
                report["bundles"].append(job.result())
            except Exception as err:  # e.g. its synthetic data could not be written
                row = {"bundle": os.path.basename(p), "stage": "data", "status": "FAILED", "seconds": 0.0}
                report["bundles"].append(
                    {"bundle": row["bundle"], "rows": [{**row, "error": f"{type(err).__name__}: {err}"}]}
                )
    if benchmark:
        networks = benchmark_networks or ("hlwa" if tiny else ",".join(NETWORKS))
        switches = benchmark_switches or ("sdpa,bf16" if tiny or device == "cpu" else "sdpa,bf16,fp16")
        try:
            results = run_benchmark(
                work_dir=os.path.join(out_dir, "speed"),
                networks=networks,
                inputs="brain" if tiny else "brain,roi",
                switches=switches,
                device=device,
                repeats=benchmark_repeats,
                tiny=tiny,
                timeout_s=600,
            )
            from common.benchmarks.speed import format_table

            report["benchmark_table"] = format_table(results)
        except Exception as err:  # the report still gets written
            report["benchmark_error"] = f"{type(err).__name__}: {err}"
    report["seconds"] = time.perf_counter() - start
    failed = [r for b in report["bundles"] for r in b["rows"] if r["status"] != "ok"]
    report["ok"] = not failed and not report["environment"]["missing"] and "benchmark_error" not in report
    with atomic_path(os.path.join(out_dir, "gpu_check.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    with atomic_path(os.path.join(out_dir, "gpu_check.md")) as tmp, open(tmp, "w") as f:
        f.write(_format(report))
    print(f"report: {os.path.join(out_dir, 'gpu_check.md')} ({'all ok' if report['ok'] else 'FAILURES'})", flush=True)
    return report


def main(command: str, out_dir: str = "runs/gpu_check", device: str = "cuda", tiny: bool = False, **kwargs) -> None:
    """``env``: print the environment check (exit 1 when a requirement is missing); ``run``: the whole check (exit 1
    on any failure)."""
    if command == "env":
        env = check_environment()
        print(json.dumps(env, indent=2))
        sys.exit(1 if env["missing"] or "error" in env.get("torch", {}) else 0)
    if command != "run":
        raise SystemExit(f"unknown command {command!r}: use env or run")
    sys.exit(0 if run_device_check(out_dir, device, tiny, **kwargs)["ok"] else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "env":  # no fire: the check must run in a broken environment too
        main("env")
    from common.cli import run_cli

    run_cli(main)
