"""The bundle harness: the checks every folder under ``bundles/`` must pass, the same way for each.

A new bundle is checked by adding it: ``tests/test_bundles.py`` runs :func:`check_bundle` on every folder under
``bundles/`` (and on the example bundle in ``tests/``). Each check raises :class:`BundleCheckError` with a
message that names the bundle, the file and what is wrong; MONAI's own bundle tools (``verify_metadata``,
``verify_net_in_out``, ``ckpt_export``, ``ConfigWorkflow.check_properties``) do the work where they exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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


def check_export(bundle_dir: str, ckpt_file: str, work_dir: str, overrides: dict[str, Any] | None = None,
                 atol: float = 1e-4) -> str:
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


def check_training_run_id(bundle_dir: str, result: PipelineResult) -> None:
    """The plain ``run`` id trains as well as ``training`` does (the collection's interface)."""
    spec = load_pipeline(bundle_dir)
    stage = dict(next(s for s in spec["stages"] if s.get("trains") and s["name"] == "train"))
    if stage.get("run_id") == "run":
        raise _fail(bundle_dir, "the pipeline's train stage should use the 'training' id; 'run' is checked here")
    stage["run_id"] = "run"
    work = os.path.join(result.work_dir, "train_via_run")
    overrides = {
        "dataset_dir": result.dataset_dir,
        "data_list_file_path": result.datalist,
        "output_dir": os.path.join(work, "out"),
        "ckpt_dir": os.path.join(work, "checkpoints"),
        "device": "cpu",
    }
    overrides.update(stage_overrides(stage, "test"))
    # what earlier stages saved in the shared ckpt_dir (e.g. a bundle's pseudo-masks) is there for the re-run too
    shutil.copytree(
        os.path.join(result.work_dir, "checkpoints"),
        overrides["ckpt_dir"],
        ignore=shutil.ignore_patterns(CHECKPOINT_NAME),
    )
    run_stage(bundle_dir, stage, overrides, os.path.join(work, "train.log"))
    if not os.path.isfile(os.path.join(work, "checkpoints", CHECKPOINT_NAME)):
        raise _fail(bundle_dir, f"'run' trained but saved no checkpoints/{CHECKPOINT_NAME}")


def check_bundle(bundle_dir: str, work_dir: str) -> PipelineResult:
    """Every check, in order: static files and metadata first, then a full tiny run and its outputs."""
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
    check_training_run_id(bundle_dir, result)
    return result


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
