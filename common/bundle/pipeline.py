"""Run a bundle's stages the way a user runs them, on synthetic data in the bundle's real data layout.

Every bundle describes its user-facing pipeline in ``configs/pipeline.json``: which public data layout it
reads, and the ordered stages (each one ``python -m monai.bundle run <run_id> --config_file ...`` from the
bundle folder) with the overrides that make them small (``"test"`` profile, for the harness and CI) or
demo-sized (``"demo"`` profile, for the main job). The harness (:mod:`common.bundle.checks`) and the main job
(``tools/main_job.py``) both run bundles through this module, so what is tested is what users run.

``pipeline.json`` keys::

    {
      "data": {"layout": "brats2021", "seed": 0, "datalist": {"val_fraction": 0.25, "test_fraction": 0.25},
               "test": {"num_cases": 4, "shape": [32, 32, 32]}, "demo": {"num_cases": 12, "shape": [96, 96, 72]}},
      "stages": [
        {"name": "train", "config_file": ["configs/train.json"], "run_id": "training", "trains": true,
         "overrides": {"epochs": 1}, "test": {"roi_size": [16, 16, 16]}, "demo": {"epochs": 20}},
        {"name": "evaluate", "config_file": ["configs/train.json", "configs/evaluate.json"], "run_id": "run",
         "uses_checkpoint": "ckpt_path", "summary": "summary.json"},
        {"name": "inference", "config_file": ["configs/inference.json"], "run_id": "run",
         "uses_checkpoint": "ckpt_path", "outputs": {"pattern": "{case}_seg.nii.gz", "reference": "image"}}
      ],
      "summary": {"stage": "evaluate", "file": "summary.json", "metrics": ["mean_dice", "mean_hd95_mm"]},
      "montage": {"image": "image", "channel": 0, "output": "{case}_seg.nii.gz", "kind": "mask", "label": "label"}
    }

Every stage receives ``dataset_dir``, ``data_list_file_path``, ``output_dir`` (``<work>/<stage>``),
``ckpt_dir`` (``<work>/checkpoints``) and ``device``; a stage with ``uses_checkpoint`` gets the trained
checkpoint (``<work>/checkpoints/model.pt``) under that config id. ``summary`` names the stage output whose
``metrics`` (the first is the headline) the main job's table shows.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PROFILES = ("test", "demo")
PIPELINE_FILE = os.path.join("configs", "pipeline.json")
CHECKPOINT_NAME = "model.pt"


class BundleRunError(RuntimeError):
    """A bundle stage failed; the message names the bundle, the stage, the command and the end of its log."""


@dataclass
class StageResult:
    """What one stage did: its command line, wall time and log file."""

    name: str
    command: list[str]
    seconds: float
    log_file: str
    output_dir: str


@dataclass
class PipelineResult:
    """The outcome of :func:`run_pipeline`: data locations, stage results and the summary metrics (name -> value)."""

    bundle: str
    dataset_dir: str
    datalist: str
    work_dir: str
    stages: list[StageResult] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def metric_name(self) -> str | None:
        """The headline metric: the first of the summary's ``metrics``."""
        return next(iter(self.metrics), None)

    @property
    def metric_value(self) -> float | None:
        return self.metrics.get(self.metric_name) if self.metric_name else None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"stage {name!r} was not run for bundle {self.bundle}")


def load_pipeline(bundle_dir: str) -> dict[str, Any]:
    """Read and validate ``configs/pipeline.json`` of ``bundle_dir``."""
    path = os.path.join(bundle_dir, PIPELINE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: every bundle needs configs/pipeline.json describing its stages")
    with open(path) as f:
        spec = json.load(f)
    for key in ("data", "stages"):
        if key not in spec:
            raise ValueError(f"{path}: missing top-level key {key!r}")
    names = [s.get("name") for s in spec["stages"]]
    if len(set(names)) != len(names) or None in names:
        raise ValueError(f"{path}: every stage needs a unique 'name', got {names}")
    for stage in spec["stages"]:
        for cfg in _as_list(stage.get("config_file")):
            if not os.path.isfile(os.path.join(bundle_dir, cfg)):
                raise FileNotFoundError(f"{path}: stage {stage['name']!r} names {cfg}, which does not exist")
    return spec


def prepare_data(bundle_dir: str, data_root: str, profile: str = "test", progress: bool = False) -> tuple[str, str]:
    """Write the bundle's synthetic dataset (reused when already there) and its datalist.

    Returns ``(dataset_dir, datalist_path)``. Datasets are shared between bundles with the same layout, size
    and seed, so the main job generates each once.
    """
    from common.data.datalist import build_datalist, save_datalist
    from common.data.synthetic.write import write_synthetic_dataset

    _check_profile(profile)
    spec = load_pipeline(bundle_dir)
    data = spec["data"]
    layout, seed = data["layout"], int(data.get("seed", 0))
    size = data[profile]
    shape = [int(s) for s in size["shape"]]
    dataset_dir = os.path.join(data_root, f"{layout}_{size['num_cases']}x{'x'.join(map(str, shape))}_seed{seed}")
    done = os.path.join(dataset_dir, ".complete")
    if not os.path.isfile(done):
        write_synthetic_dataset(
            layout, dataset_dir, num_cases=int(size["num_cases"]), shape=shape, seed=seed, progress=progress
        )
        with open(done, "w") as f:
            f.write("synthetic dataset written completely\n")
    datalist_path = os.path.join(data_root, f"{os.path.basename(dataset_dir)}_datalist.json")
    datalist = build_datalist(layout, dataset_dir, seed=seed, progress=False, **data.get("datalist", {}))
    save_datalist(datalist, datalist_path)
    return dataset_dir, datalist_path


def stage_overrides(stage: dict[str, Any], profile: str) -> dict[str, Any]:
    """The stage's overrides: ``overrides`` first, then those of the profile."""
    _check_profile(profile)
    out = dict(stage.get("overrides", {}))
    out.update(stage.get(profile, {}))
    return out


def stage_run_overrides(
    stage: dict[str, Any],
    profile: str,
    dataset_dir: str,
    datalist: str,
    output_dir: str,
    ckpt_dir: str,
    device: str,
) -> dict[str, Any]:
    """Everything a stage is run with: the data, ``output_dir``, ``ckpt_dir`` and ``device``, the trained checkpoint
    ``<ckpt_dir>/model.pt`` under the stage's ``uses_checkpoint`` id (when it has one), then
    :func:`stage_overrides` of ``profile``."""
    overrides: dict[str, Any] = {
        "dataset_dir": dataset_dir,
        "data_list_file_path": datalist,
        "output_dir": output_dir,
        "ckpt_dir": ckpt_dir,
        "device": device,
    }
    if stage.get("uses_checkpoint"):
        overrides[stage["uses_checkpoint"]] = os.path.join(ckpt_dir, CHECKPOINT_NAME)
    overrides.update(stage_overrides(stage, profile))
    return overrides


def stage_command(stage: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """The exact command line a user would type (from the bundle folder) for ``stage``."""
    configs = _as_list(stage["config_file"])
    config_arg = configs[0] if len(configs) == 1 else json.dumps(configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", stage.get("run_id", "run"), "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]  # fire parses Python literals
    return cmd


def run_stage(
    bundle_dir: str,
    stage: dict[str, Any],
    overrides: dict[str, Any],
    log_file: str,
    timeout: float | None = None,
    echo: bool = False,
) -> StageResult:
    """Run one stage in a subprocess from the bundle folder; raise :class:`BundleRunError` on failure."""
    cmd = stage_command(stage, overrides)
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log_file, "w", buffering=1) as log:  # line-buffered: `tail -f` shows progress live
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=bundle_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    print(f"    {line}", end="", flush=True)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log_file) as f:
            tail = "".join(f.readlines()[-40:])
        raise BundleRunError(
            f"bundle {os.path.basename(os.path.abspath(bundle_dir))}, stage {stage['name']!r} exited with "
            f"{proc.returncode}\ncommand: {shlex.join(cmd)}\nlog: {log_file}\n--- last lines ---\n{tail}"
        )
    return StageResult(stage["name"], cmd, seconds, log_file, str(overrides.get("output_dir", "")))


def run_pipeline(
    bundle_dir: str,
    work_dir: str,
    profile: str = "test",
    device: str = "cpu",
    data_root: str | None = None,
    stages: Sequence[str] | None = None,
    extra_overrides: dict[str, dict[str, Any]] | None = None,
    echo: bool = False,
) -> PipelineResult:
    """Generate data, then run the bundle's stages in order (all, or those named in ``stages``).

    Args:
        bundle_dir: the bundle folder (holding ``configs/``).
        work_dir: where checkpoints, stage outputs and logs go (never inside the bundle).
        profile: ``"test"`` (tiny, for CI) or ``"demo"`` (the main job).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        data_root: where synthetic datasets are written (default ``<work_dir>/data``).
        stages: names of the stages to run, in the pipeline's order; default all.
        extra_overrides: per-stage overrides on top of the pipeline's, e.g. ``{"train": {"epochs": 3}}``.
        echo: print the stages' output while they run.
    """
    spec = load_pipeline(bundle_dir)
    work_dir = os.path.abspath(work_dir)
    data_root = os.path.abspath(data_root or os.path.join(work_dir, "data"))
    dataset_dir, datalist = prepare_data(bundle_dir, data_root, profile, progress=echo)
    name = os.path.basename(os.path.abspath(bundle_dir))
    result = PipelineResult(name, dataset_dir, datalist, work_dir)
    ckpt_dir = os.path.join(work_dir, "checkpoints")
    wanted = set(stages) if stages is not None else None
    for stage in spec["stages"]:
        if wanted is not None and stage["name"] not in wanted:
            continue
        out_dir = os.path.join(work_dir, stage["name"])
        overrides = stage_run_overrides(stage, profile, dataset_dir, datalist, out_dir, ckpt_dir, device)
        overrides.update((extra_overrides or {}).get(stage["name"], {}))
        log_file = os.path.join(work_dir, "logs", f"{stage['name']}.log")
        result.stages.append(run_stage(bundle_dir, stage, overrides, log_file, echo=echo))
    summary = spec.get("summary")
    if summary and (wanted is None or summary["stage"] in wanted):
        path = os.path.join(work_dir, summary["stage"], summary["file"])
        result.metrics = read_summary_metrics(path, summary["metrics"])
    return result


def read_summary_metrics(path: str, names: Sequence[str]) -> dict[str, float | None]:
    """``{name: value}`` of ``names`` in the summary JSON ``path``, in that order (``None`` where the value is null).

    Raises ``BundleRunError`` naming the file when a name is missing (a misspelt key fails loudly).
    """
    with open(path) as f:
        values = json.load(f)
    missing = [n for n in names if n not in values]
    if missing:
        raise BundleRunError(f"{path}: summary has no {missing} (keys: {sorted(values)})")
    return {n: None if values[n] is None else float(values[n]) for n in names}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
