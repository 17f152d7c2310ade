"""The bundle harness: the checks every folder under ``bundles/`` must pass, the same way for each.

A new bundle is checked by adding it: ``tests/test_bundles.py`` runs :func:`check_bundle` on every folder under
``bundles/`` (and on the example bundle in ``tests/``). Each check raises :class:`BundleCheckError` with a
message that names the bundle, the file and what is wrong; MONAI's own bundle tools (``verify_metadata``,
``verify_net_in_out``, ``ckpt_export``, ``onnx_export``, ``ConfigWorkflow.check_properties``) do the work where they
exist; ``torch.export`` (which MONAI's CLI lacks) goes through :mod:`common.bundle.export`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch

from common.bundle.pipeline import (
    CHECKPOINT_NAME,
    PipelineResult,
    load_pipeline,
    run_pipeline,
    run_stage,
    read_summary_metrics,
    stage_overrides,
)

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "schemas", "meta_schema_20240725.json")

REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/pipeline.json",
    "LICENSE",
    "docs/README.md",
)
TRAIN_KEYS = (
    "dataset_dir",
    "data_list_file_path",
    "output_dir",
    "ckpt_dir",
    "epochs",
    "val_interval",
    "learning_rate",
    "batch_size",
    "num_workers",
    "roi_size",
    "device",
    "training",
    "run",
)
INFER_KEYS = ("dataset_dir", "data_list_file_path", "output_dir", "device", "ckpt_path", "network_def", "run")


class BundleCheckError(AssertionError):
    """A bundle breaks the collection's contract; the message says which bundle, file and rule."""


def _fail(bundle_dir: str, what: str) -> BundleCheckError:
    return BundleCheckError(f"bundle {os.path.basename(os.path.abspath(bundle_dir))}: {what}")


def _load_json(bundle_dir: str, rel: str) -> dict[str, Any]:
    path = os.path.join(bundle_dir, rel)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(bundle_dir, f"{rel} cannot be read as JSON: {err}") from err


def check_required_files(bundle_dir: str) -> None:
    """The Model Zoo's required files exist, ``models/`` exists, and the metadata version is in its changelog."""
    missing = [rel for rel in REQUIRED_FILES if not os.path.isfile(os.path.join(bundle_dir, rel))]
    if not os.path.isdir(os.path.join(bundle_dir, "models")):
        missing.append("models/")
    if missing:
        raise _fail(bundle_dir, f"missing required files: {', '.join(missing)}")
    meta = _load_json(bundle_dir, "configs/metadata.json")
    version = meta.get("version")
    if version not in meta.get("changelog", {}):
        raise _fail(bundle_dir, f"configs/metadata.json: version {version!r} is not listed in 'changelog'")
    load_pipeline(bundle_dir)


def check_metadata(bundle_dir: str, schema_file: str = SCHEMA_FILE) -> None:
    """``monai.bundle.verify_metadata`` against the schema copy shipped here (no download)."""
    from monai.bundle import verify_metadata

    meta = _load_json(bundle_dir, "configs/metadata.json")
    if meta.get("schema") != SCHEMA_URL:
        raise _fail(bundle_dir, f"configs/metadata.json: 'schema' must be {SCHEMA_URL}")
    try:
        verify_metadata(meta_file=os.path.join(bundle_dir, "configs/metadata.json"), filepath=schema_file)
    except ValueError as err:
        raise _fail(bundle_dir, f"configs/metadata.json breaks the metadata schema: {err}") from err


def _config_keys(bundle_dir: str, config_files: list[str]) -> set[str]:
    keys: set[str] = set()
    for rel in config_files:
        keys.update(_load_json(bundle_dir, rel).keys())
    return keys


def check_interface(bundle_dir: str) -> None:
    """Train and inference configs expose the ids the collection's interface promises."""
    spec = load_pipeline(bundle_dir)
    train_cfgs = [s["config_file"] for s in spec["stages"] if s.get("trains")]
    problems = []
    for cfgs in train_cfgs:
        cfgs = [cfgs] if isinstance(cfgs, str) else cfgs
        missing = [k for k in TRAIN_KEYS if k not in _config_keys(bundle_dir, cfgs)]
        if missing:
            problems.append(f"{', '.join(cfgs)} lacks {missing}")
    missing = [k for k in INFER_KEYS if k not in _config_keys(bundle_dir, ["configs/inference.json"])]
    if missing:
        problems.append(f"configs/inference.json lacks {missing}")
    if problems:
        raise _fail(bundle_dir, "; ".join(problems))


def check_properties(bundle_dir: str, overrides: dict[str, Any]) -> None:
    """MONAI's own property checks for the train and inference workflows (``ConfigWorkflow.check_properties``)."""
    from monai.bundle import ConfigWorkflow

    spec = load_pipeline(bundle_dir)
    cases = [(s["config_file"], "train") for s in spec["stages"] if s.get("trains")]
    cases.append(("configs/inference.json", "infer"))
    with _chdir(bundle_dir):
        for config_file, workflow_type in cases:
            files = [config_file] if isinstance(config_file, str) else list(config_file)
            wf = ConfigWorkflow(config_file=files, workflow_type=workflow_type, **overrides)
            wf.initialize()
            missing = wf.check_properties()
            if missing:
                raise _fail(bundle_dir, f"{files} ({workflow_type}) misses MONAI bundle properties {missing}")


def check_net_in_out(bundle_dir: str) -> None:
    """``monai.bundle.verify_net_in_out`` on the inference config's ``network_def`` against the metadata."""
    from monai.bundle import verify_net_in_out

    with _chdir(bundle_dir):
        try:
            verify_net_in_out(
                net_id="network_def",
                meta_file="configs/metadata.json",
                config_file="configs/inference.json",
                device="cpu",
                n=1,
                p=1,
                any=1,
            )
        except (ValueError, RuntimeError, KeyError) as err:
            raise _fail(bundle_dir, f"network input/output disagree with configs/metadata.json: {err}") from err


def check_export(
    bundle_dir: str, ckpt_file: str, work_dir: str, overrides: dict[str, Any] | None = None, atol: float = 1e-4
) -> str:
    """``monai.bundle ckpt_export`` to TorchScript; the exported module's output equals eager's.

    ``overrides`` (e.g. ``{"network_def#features": [...]}``) make the network match a checkpoint trained with a
    smaller test configuration. Returns the path of the exported ``.ts`` file.
    """
    overrides = dict(overrides or {})
    from monai.bundle import ConfigParser, ckpt_export

    ts_file = os.path.join(work_dir, "model.ts")
    with _chdir(bundle_dir):
        ckpt_export(
            net_id="network_def",
            filepath=ts_file,
            ckpt_file=ckpt_file,
            meta_file="configs/metadata.json",
            config_file="configs/inference.json",
            **overrides,
        )
        parser = ConfigParser()
        parser.read_config("configs/inference.json")
        parser.read_meta("configs/metadata.json")
        parser.update(overrides)
        net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    net.eval()
    exported = torch.jit.load(ts_file, map_location="cpu")
    exported.eval()
    x = torch.rand(1, *_input_shape(parser))
    with torch.no_grad():
        expected, got = net(x), exported(x)
    if not torch.allclose(expected, got, atol=atol):
        raise _fail(bundle_dir, f"TorchScript output differs from eager by {(expected - got).abs().max():.3g}")
    return ts_file


def _input_shape(parser: Any) -> tuple[int, ...]:
    """(C, *spatial) of the metadata's first input, sizes like ``"16*n"`` or ``"2**p"`` taken at n = p = 1."""
    first = next(iter(parser.get("_meta_#network_data_format#inputs").values()))
    spatial = []
    for size in first["spatial_shape"]:
        text = str(size).strip()
        spatial.append(1 if text == "*" else int(eval(text.replace("n", "1").replace("p", "1"), {"__builtins__": {}})))
    return (int(first["num_channels"]), *spatial)


#: ONNX export settings of a bundle without an ``onnx_export`` entry in its metadata
ONNX_DEFAULTS: dict[str, Any] = {"opset_version": 17, "dynamo": False, "atol": 1e-4, "rtol": 1e-4}


def onnx_export_settings(bundle_dir: str) -> dict[str, Any]:
    """The bundle's ONNX export settings: ``configs/metadata.json`` ``onnx_export`` over :data:`ONNX_DEFAULTS`.

    ``opset_version`` (int), ``dynamo`` (bool: ``torch.onnx``'s dynamo exporter, which needs ``onnxscript``,
    instead of the TorchScript-based one), ``atol`` and ``rtol`` (onnxruntime against eager PyTorch), and
    ``spatial_size_id`` (optional: the inference config id holding the spatial size to export at, e.g.
    ``"roi_size"``; default the metadata's input ``spatial_shape`` at ``n = p = 1``). An ONNX graph has fixed sizes,
    so a network that is only exportable at one size names it here. ``packages`` pins what the export needs on top
    of ``required_packages_version`` (onnx, onnxruntime, onnxscript for dynamo); not ``optional_packages_version``,
    which MONAI 1.6 reads as a deprecated name of ``required_packages_version`` and renames over it. Other keys
    (e.g. a ``note`` on why) are kept and ignored.
    """
    settings = dict(ONNX_DEFAULTS)
    given = _load_json(bundle_dir, "configs/metadata.json").get("onnx_export", {})
    if not isinstance(given, dict):
        raise _fail(bundle_dir, "configs/metadata.json: 'onnx_export' must be an object")
    settings.update(given)
    kinds = {"opset_version": int, "dynamo": bool, "atol": (int, float), "rtol": (int, float)}
    for key, kind in kinds.items():
        if not isinstance(settings[key], kind) or (kind is int and isinstance(settings[key], bool)):
            raise _fail(bundle_dir, f"configs/metadata.json: onnx_export#{key} has the wrong type: {settings[key]!r}")
    if not isinstance(settings.get("spatial_size_id", ""), str):
        raise _fail(bundle_dir, "configs/metadata.json: onnx_export#spatial_size_id must be a config id (a string)")
    return settings


def onnx_input_shape(parser: Any, settings: dict[str, Any]) -> tuple[int, ...]:
    """``(1, C, *spatial)`` of the ONNX export: ``C`` from the metadata, the sizes from ``settings`` (see above)."""
    channels, *spatial = _input_shape(parser)
    if settings.get("spatial_size_id"):
        spatial = [int(s) for s in parser.get_parsed_content(settings["spatial_size_id"])]
    return (1, channels, *spatial)


def onnx_export_command(
    ckpt_file: str,
    onnx_file: str,
    input_shape: tuple[int, ...] | list[int],
    settings: dict[str, Any],
    overrides: dict[str, Any] | None = None,
) -> list[str]:
    """``python -m monai.bundle onnx_export network_def ...`` as run from the bundle folder (and in the model cards).

    ``--use_trace True`` hands ``converter_kwargs`` (``opset_version``, ``dynamo``) to ``torch.onnx.export``: with
    ``use_trace False``, MONAI 1.6 on torch >= 2.9 always takes the dynamo exporter, which needs ``onnxscript``.
    """
    converter = {"opset_version": int(settings["opset_version"]), "dynamo": bool(settings["dynamo"])}
    cmd = [sys.executable, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", onnx_file]
    cmd += ["--ckpt_file", ckpt_file, "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    cmd += ["--input_shape", repr([int(s) for s in input_shape]), "--use_trace", "True"]
    cmd += ["--converter_kwargs", repr(converter)]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return cmd


def check_onnx_export(
    bundle_dir: str,
    ckpt_file: str,
    work_dir: str,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> str:
    """``python -m monai.bundle onnx_export``; onnxruntime's output on the exported file equals eager PyTorch's.

    Runs the command users run (:func:`onnx_export_command`, from the bundle folder, settings from
    :func:`onnx_export_settings`) in a subprocess with environment ``env`` (default: this one), then feeds the same
    random input (shape :func:`onnx_input_shape`) to onnxruntime and to the eager network with the checkpoint
    loaded. ``overrides`` make the network match a checkpoint trained with a smaller test configuration.
    Returns the path of the exported ``.onnx`` file.
    """
    import onnxruntime
    from monai.bundle import ConfigParser

    settings = onnx_export_settings(bundle_dir)
    overrides = dict(overrides or {})
    parser = ConfigParser()
    with _chdir(bundle_dir):
        parser.read_config("configs/inference.json")
        parser.read_meta("configs/metadata.json")
    parser.update(overrides)
    shape = onnx_input_shape(parser, settings)
    onnx_file = os.path.join(os.path.abspath(work_dir), "model.onnx")
    cmd = onnx_export_command(os.path.abspath(ckpt_file), onnx_file, shape, settings, overrides)
    proc = subprocess.run(cmd, cwd=bundle_dir, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not os.path.isfile(onnx_file):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise _fail(
            bundle_dir,
            f"onnx_export (opset {settings['opset_version']}, dynamo={settings['dynamo']}) failed with exit status "
            f"{proc.returncode}\ncommand: {shlex.join(cmd)}\n--- last lines ---\n{tail}",
        )
    with _chdir(bundle_dir):
        net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    net.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = net(x).numpy()
    if got.shape != expected.shape or not np.allclose(got, expected, atol=settings["atol"], rtol=settings["rtol"]):
        diff = np.abs(got - expected).max() if got.shape == expected.shape else f"shape {got.shape} vs {expected.shape}"
        raise _fail(
            bundle_dir,
            f"onnxruntime output differs from eager by {diff} (atol {settings['atol']}, rtol {settings['rtol']})",
        )
    return onnx_file


def check_torch_export(
    bundle_dir: str,
    ckpt_file: str,
    work_dir: str,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> str:
    """``torch.export`` to an ExportedProgram (:func:`common.bundle.export.export_bundle`); the program loaded back
    from the ``.pt2`` file gives eager PyTorch's output, on the export input and on a second random input of the
    same shape (so no input was folded into the graph). Returns the path of the ``.pt2`` file."""
    from common.bundle.export import bundle_network, export_bundle

    settings = onnx_export_settings(bundle_dir)
    pt2_file = os.path.join(os.path.abspath(work_dir), "model.pt2")
    try:
        export_bundle(bundle_dir, ckpt_file, pt2_file, overrides=overrides)
    except Exception as err:  # torch.export names the unsupported construct; keep its message
        raise _fail(bundle_dir, f"torch.export failed: {type(err).__name__}: {str(err)[:2000]}") from err
    net, parser = bundle_network(bundle_dir, ckpt_file, overrides)
    program = torch.export.load(pt2_file).module()
    shape = onnx_input_shape(parser, settings)
    for seed in (0, 1):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected, got = net(x), program(x)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=rtol):
            diff = (got - expected).abs().max() if got.shape == expected.shape else f"shape {got.shape}"
            raise _fail(bundle_dir, f"torch.export program output differs from eager by {diff} (atol {atol})")
    return pt2_file


def onnx_exporter_available(settings: dict[str, Any]) -> bool:
    """Whether this environment can run the exporter ``settings`` ask for (the dynamo one needs ``onnxscript``)."""
    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if settings["dynamo"] else [])
    return all(importlib.util.find_spec(name) is not None for name in needed)


def check_inference_outputs(bundle_dir: str, result: PipelineResult, stage_name: str = "inference") -> list[str]:
    """Each testing case has its output file, with the input's spatial shape and affine.

    Returns the list of output files checked.
    """
    spec = load_pipeline(bundle_dir)
    stage = next(s for s in spec["stages"] if s["name"] == stage_name)
    outputs = stage.get("outputs")
    if not outputs:
        raise _fail(bundle_dir, f"configs/pipeline.json: stage {stage_name!r} declares no 'outputs'")
    with open(result.datalist) as f:
        cases = json.load(f)[outputs.get("list", "testing")]
    if not cases:
        raise _fail(bundle_dir, f"{result.datalist}: empty testing list, nothing to check")
    out_dir = os.path.join(result.work_dir, stage_name)
    checked = []
    for item in cases:
        out = os.path.join(out_dir, outputs["pattern"].format(**item))
        if not os.path.isfile(out):
            raise _fail(bundle_dir, f"inference wrote no {out} for case {item.get('case')}")
        ref = item[outputs.get("reference", "image")]
        ref = ref[0] if isinstance(ref, list) else ref
        ref_img = nib.load(os.path.join(result.dataset_dir, ref))
        out_img = nib.load(out)
        if tuple(out_img.shape[:3]) != tuple(ref_img.shape[:3]):
            raise _fail(bundle_dir, f"{out}: shape {out_img.shape[:3]} differs from the input's {ref_img.shape[:3]}")
        if not np.allclose(out_img.affine, ref_img.affine, atol=1e-4):
            raise _fail(
                bundle_dir, f"{out}: affine differs from the input's ({ref}):\n{out_img.affine}\nvs\n{ref_img.affine}"
            )
        checked.append(out)
    return checked


#: the learning check's settings, each overridden by the ``"learning"`` object of ``configs/pipeline.json``: the
#: stages re-run, in the pipeline's order, with ``stages[name]`` on top of each one's test profile (``"train"``
#: always, run without validation; earlier ones when the model depends on them, e.g. COVID-19's GAN and pseudo-masks);
#: the fraction by which the mean loss of the train stage's last epoch must be below that of its first; the loss's
#: log tag; and the evaluation of the trained and the untrained model (the list it reads, ``evaluate_overrides`` on
#: top of the evaluate stage's test profile), which a bundle can only turn off with the reason (``untrained_reason``),
#: shown as a warning by every harness run.
LEARNING_DEFAULTS: dict[str, Any] = {
    "stages": {"train": {"epochs": 8, "val_interval": 1000, "learning_rate": 0.003}},
    "loss_drop": 0.05,
    "tag": "train_loss",
    "evaluate_list": "training",
    "evaluate_overrides": {},
    "compare_untrained": True,
    "untrained_reason": "",
}


@dataclass
class LearningResult:
    """What :func:`check_learning` measured: the mean loss of each epoch, and the summary metric (on the training
    cases) of the trained model and of an untrained one."""

    epoch_losses: list[float]
    metric_name: str | None = None
    trained: float | None = None
    untrained: float | None = None


@dataclass
class HarnessResult:
    """What :func:`check_bundle` ran: the bundle's pipeline, and the learning check."""

    pipeline: PipelineResult
    learning: LearningResult


def epoch_losses(log_text: str, tag: str = "train_loss") -> list[float]:
    """Mean of the iteration losses of each epoch, from the lines MONAI's ``StatsHandler`` logs
    (``"Epoch: 2/6, Iter: 1/2 -- train_loss: 0.8123"``), in epoch order."""
    found: dict[int, list[float]] = {}
    for epoch, value in re.findall(rf"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- {re.escape(tag)}: (\S+)", log_text):
        found.setdefault(int(epoch), []).append(float(value))
    return [float(np.mean(found[e])) for e in sorted(found)]


def _untrained_checkpoint(bundle_dir: str, stage: dict[str, Any], path: str) -> str:
    """The weights of a freshly initialised ``network_def`` of ``stage``'s configs (test profile), saved to ``path``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    with _chdir(bundle_dir):
        parser.read_config(_as_files(stage["config_file"]))
    parser.update({k: v for k, v in stage_overrides(stage, "test").items() if k.startswith("network_def")})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _as_files(config_file: str | list[str]) -> list[str]:
    return [config_file] if isinstance(config_file, str) else list(config_file)


def check_learning(bundle_dir: str, result: PipelineResult) -> LearningResult:
    """Training learns, and the plain ``run`` id trains as well as ``training`` does (the collection's interface).

    The train stage is run again through ``run``, longer and faster (:data:`LEARNING_DEFAULTS`, or the
    ``"learning"`` object of ``configs/pipeline.json``), after the earlier stages it names (COVID-19: the GAN and its
    pseudo-masks); the mean loss of its last epoch must be lower than that of its first by ``loss_drop``, and the
    evaluate stage, on the cases it trained on (``evaluate_list`` ``"training"``; COVID-19: ``"validation"``, as its
    training studies have no mask), must give it a better summary metric (higher: Dice, SSIM) than the same network
    untrained. What the harness run saved in ``ckpt_dir`` (e.g. pseudo-masks) is there for the re-run too. The test
    profile trains one epoch at the configs' learning rate, too little to show either.

    Raises:
        BundleCheckError: a stage fails, the loss does not drop, or the trained model is not better.
    """
    spec = load_pipeline(bundle_dir)
    stages = {s["name"]: s for s in spec["stages"]}
    stage = dict(stages["train"])
    if stage.get("run_id") == "run":
        raise _fail(bundle_dir, "the pipeline's train stage should use the 'training' id; 'run' is checked here")
    stage["run_id"] = "run"
    learning = {**LEARNING_DEFAULTS, **spec.get("learning", {})}
    unknown = sorted(set(learning) - set(LEARNING_DEFAULTS))
    if unknown:
        raise _fail(bundle_dir, f"configs/pipeline.json: 'learning' has unknown keys {unknown}")
    if "train" not in learning["stages"] or set(learning["stages"]) - set(stages):
        raise _fail(bundle_dir, f"configs/pipeline.json: learning#stages {sorted(learning['stages'])} must name "
                    f"the train stage and stages of the pipeline")  # fmt: skip
    if not learning["compare_untrained"] and not learning["untrained_reason"]:
        raise _fail(bundle_dir, "configs/pipeline.json: learning#compare_untrained false needs an untrained_reason")
    work = os.path.join(result.work_dir, "train_via_run")
    ckpt_dir = os.path.join(work, "checkpoints")
    common = {"dataset_dir": result.dataset_dir, "data_list_file_path": result.datalist, "device": "cpu"}
    shutil.copytree(
        os.path.join(result.work_dir, "checkpoints"), ckpt_dir, ignore=shutil.ignore_patterns(CHECKPOINT_NAME, "*.ckpt")
    )
    logs = {}
    for name in (s["name"] for s in spec["stages"] if s["name"] in learning["stages"]):
        run = stage if name == "train" else stages[name]
        overrides = {**common, "output_dir": os.path.join(work, name), "ckpt_dir": ckpt_dir}
        overrides.update(stage_overrides(run, "test"))
        overrides.update(learning["stages"][name])
        logs[name] = run_stage(bundle_dir, run, overrides, os.path.join(work, f"{name}.log")).log_file
    log = logs["train"]
    model = os.path.join(ckpt_dir, CHECKPOINT_NAME)
    if not os.path.isfile(model):
        raise _fail(bundle_dir, f"'run' trained but saved no checkpoints/{CHECKPOINT_NAME}")
    with open(log) as f:
        losses = epoch_losses(f.read(), learning["tag"])
    if len(losses) < 2 or not losses[-1] < (1.0 - learning["loss_drop"]) * losses[0]:
        raise _fail(
            bundle_dir,
            f"training did not lower its loss by {learning['loss_drop']:.0%} in {len(losses)} epochs "
            f"(epoch means {[round(v, 4) for v in losses]}; log {log})",
        )
    if not learning["compare_untrained"]:
        warnings.warn(
            f"bundle {os.path.basename(os.path.abspath(bundle_dir))}: the trained model is not compared with an "
            f"untrained one: {learning['untrained_reason']}",
            stacklevel=2,
        )
        return LearningResult(losses)
    summary = spec["summary"]
    headline = summary["metrics"][0]  # higher is better for every bundle's headline metric (Dice, SSIM)
    evaluate = stages[summary["stage"]]
    untrained = _untrained_checkpoint(bundle_dir, evaluate, os.path.join(work, "untrained.pt"))
    metric = {}
    for name, ckpt in (("trained", model), ("untrained", untrained)):
        out = os.path.join(work, f"evaluate_{name}")
        ov = {**common, "output_dir": out, "ckpt_dir": ckpt_dir, evaluate["uses_checkpoint"]: ckpt}
        ov.update(stage_overrides(evaluate, "test"))
        ov.update({"evaluate_list": learning["evaluate_list"], **learning["evaluate_overrides"]})
        run_stage(bundle_dir, evaluate, ov, os.path.join(work, f"evaluate_{name}.log"))
        metric[name] = read_summary_metrics(os.path.join(out, summary["file"]), [headline])[headline]
    if not metric["trained"] > metric["untrained"]:
        raise _fail(
            bundle_dir,
            f"the trained model is no better than an untrained one on the cases it trained on: {headline} "
            f"{metric['trained']:.4f} vs {metric['untrained']:.4f}",
        )
    return LearningResult(losses, headline, metric["trained"], metric["untrained"])


def check_bundle(bundle_dir: str, work_dir: str) -> HarnessResult:
    """Every check, in order: static files and metadata first, then a full tiny run and its outputs, then the
    learning check (:func:`check_learning`)."""
    check_required_files(bundle_dir)
    check_metadata(bundle_dir)
    check_interface(bundle_dir)
    check_net_in_out(bundle_dir)
    result = run_pipeline(bundle_dir, work_dir, profile="test", device="cpu")
    ckpt = os.path.join(work_dir, "checkpoints", CHECKPOINT_NAME)
    if not os.path.isfile(ckpt):
        raise _fail(bundle_dir, f"training saved no {ckpt}")
    check_inference_outputs(bundle_dir, result)
    infer_stage = next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == "inference")
    net_overrides = {k: v for k, v in stage_overrides(infer_stage, "test").items() if k.startswith("network_def")}
    check_export(bundle_dir, ckpt, work_dir, net_overrides)
    check_torch_export(bundle_dir, ckpt, work_dir, net_overrides)
    settings = onnx_export_settings(bundle_dir)
    if onnx_exporter_available(settings):
        check_onnx_export(bundle_dir, ckpt, work_dir, net_overrides)
    else:  # tests/bundle/test_onnx_export.py runs it with onnxscript installed on the side
        warnings.warn(
            f"bundle {os.path.basename(os.path.abspath(bundle_dir))}: ONNX export check skipped, its exporter "
            f"(dynamo={settings['dynamo']}) needs onnx, onnxruntime{' and onnxscript' if settings['dynamo'] else ''}",
            stacklevel=2,
        )
    check_properties(
        bundle_dir,
        {
            "dataset_dir": result.dataset_dir,
            "data_list_file_path": result.datalist,
            "output_dir": os.path.join(work_dir, "properties"),
            "ckpt_dir": os.path.join(work_dir, "checkpoints"),
            "ckpt_path": ckpt,
            "device": "cpu",
        },
    )
    return HarnessResult(result, check_learning(bundle_dir, result))


@contextlib.contextmanager
def _chdir(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def temporary_work_dir() -> tempfile.TemporaryDirectory:
    """A scratch folder for a harness run (used by the tests and ``tools/check_bundle.py``)."""
    return tempfile.TemporaryDirectory(prefix="bundle-check-")
