"""Bad input through every bundle: each planted defect is reported with its file and problem, or handled.

For each bundle, one synthetic dataset in a real layout holds one clean case per defect of
:mod:`common.data.synthetic.defects` plus clean cases, and three bundle runs (module-scoped, shared by the tests):

- inference over the good case and every defective case: each case with a damaged image file is skipped with one
  warning naming the file and the problem and gets no output; the good case, the cases whose only damage is in the
  label (inference does not read labels) and the benign cases are written on their input's grid and affine; the
  run ends with exit status 2 and one error listing every skipped case;
- training over the good case and every fatal defect: exit status 2 before anything is built, one stderr line
  per problem naming the file, no traceback, no checkpoint and no output file;
- one tiny training epoch (the test profile of ``configs/pipeline.json``) over the good and the benign cases:
  it trains and saves ``model.pt`` (COVID: the GAN, its pseudo-masks, then the TransUNet, in turn).

Every training config (multi-GPU, evaluation and COVID's pseudo-masks included) is also shown, in process, to
refuse the fatal datalist in ``initialize``; the combinations that do not exist are listed in ``NOT_MEANINGFUL``.

Beyond the integrity check: a problem that only a transform finds (a chest CT without lungs, one too small to be a
chest CT) skips that case the same way; an empty ``testing`` list and a missing checkpoint say what to do; and the
cases with several outputs (MedSegDiff, DC2Fusion) are written as a set, all files or none.

The brain bundles use two layouts between them, so that "three channels where four are expected" is tested in
both forms: HLWA on ``brats2021`` (a 4D 3-channel file where a 3D modality is expected) and MedSegDiff on
``msd_task01`` (the 4D image without its last channel).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor

from common.bundle.pipeline import load_pipeline, stage_command, stage_overrides
from common.cli import data_error_message
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.defects import BENIGN_DEFECTS, DEFECTS, applicable_defects, eligible_cases, plant_defect
from common.data.synthetic.write import write_synthetic_dataset
from common.data.writers import save_nifti
from common.errors import DataError
from common.io import partial_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class BundleCase:
    """How one bundle is exercised: its folder, the layout and grid of its data, its training stages."""

    folder: str
    layout: str
    shape: tuple[int, int, int]
    min_size: tuple[int, int, int]  # smaller_than_roi shrinks every axis below this (file axis order)
    train_stages: tuple[str, ...] = ("train",)  # run in order; the first one is refused on fatal defects


BUNDLES: dict[str, BundleCase] = {
    "hlwa": BundleCase("brats_mri_hlwa_segmentation", "brats2021", (32, 32, 32), (32, 32, 32)),
    "medsegdiff": BundleCase("brats_mri_medsegdiff_segmentation", "msd_task01", (32, 32, 32), (32, 32, 32)),
    # the CT is resampled from its lung box to the grid, so "smaller than the ROI" is a CT with fewer slices
    # (8) than the ROI's 16, keeping the 32 x 32 matrix that common.data.chest_ct requires of a chest CT
    "covid": BundleCase(
        "covid_ct_gan_transunet_segmentation",
        "mosmed",
        (64, 64, 16),
        (65, 65, 16),
        ("train_gan", "pseudo_masks", "train"),
    ),
    "dc2fusion": BundleCase("adni_mri_pet_dc2fusion", "adni_pairs", (32, 32, 32), (32, 32, 32)),
}

#: (bundle, defect) combinations that do not exist in the bundle's data, and why.
NOT_MEANINGFUL: dict[tuple[str, str], str] = {
    ("covid", "missing_modality"): "a MosMed study is one CT file: without it there is no case, no modality missing",
    ("dc2fusion", "bad_label_values"): "unsupervised MRI-PET fusion: ADNI pairs have no label",
}

#: what the one line about each fatal defect must say (in the training error and the inference warning)
PROBLEM_WORDS: dict[str, str] = {
    "truncated": r"truncated",
    "not_nifti": r"not a NIfTI file",
    "missing_modality": r"not found|missing",
    "three_channels": r"4D|channel",
    "nan": r"NaN",
    "affine_mismatch": r"affine",
    "bad_label_values": r"label value",
    "all_zero": r"all zero",
}

COMBINATIONS = [
    pytest.param(name, defect, id=f"{name}-{defect}")
    for name in BUNDLES
    for defect in DEFECTS
    if (name, defect) not in NOT_MEANINGFUL
]
FATAL = [p for p in COMBINATIONS if p.values[1] not in BENIGN_DEFECTS]
BENIGN = [p for p in COMBINATIONS if p.values[1] in BENIGN_DEFECTS]


@dataclass
class Prepared:
    """A bundle's synthetic dataset with its defects planted, and the datalists of the three runs."""

    name: str
    bundle_dir: str
    data_dir: str
    work: str
    good: dict[str, Any]
    spare: dict[str, Any]
    planted: dict[str, tuple[dict[str, Any], list[str]]] = field(default_factory=dict)  # defect -> (item, paths)
    datalists: dict[str, str] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Run:
    """A finished ``monai.bundle run``: exit status, separate stdout and stderr, and its folders."""

    returncode: int
    stdout: str
    stderr: str
    output_dir: str
    ckpt_dir: str


def _planting_id(layout: str, item: dict[str, Any]) -> str:
    return item["subject"] if layout == "adni_pairs" else item["case"]


def _trainable(name: str, item: dict[str, Any]) -> bool:
    """Can the case be in the training list of the bundle's first training stage?"""
    if name == "covid":  # the GAN trains on unmasked studies; the benign ones are COVID-19 ones (CT-0 is `good`)
        return "label" not in item and item["category"] != "CT-0"
    return "label" in item or BUNDLES[name].layout == "adni_pairs"


def _plantable(name: str, eligible: set[str], needs_training: bool, item: dict[str, Any]) -> bool:
    return _planting_id(BUNDLES[name].layout, item) in eligible and (not needs_training or _trainable(name, item))


def _prepare(name: str, root: str) -> Prepared:
    spec = BUNDLES[name]
    layout = spec.layout
    defects = applicable_defects(layout)
    assert {d for d in DEFECTS if d not in defects} == {d for n, d in NOT_MEANINGFUL if n == name}
    data_dir = os.path.join(root, "data")
    num_cases = len(defects) + (5 if layout == "mosmed" else 2)
    write_synthetic_dataset(layout, data_dir, num_cases=num_cases, shape=spec.shape, seed=0, progress=False)
    clean = build_datalist(layout, data_dir, seed=0, progress=False)
    items = sorted(
        (it for key in ("training", "validation", "testing") for it in clean[key]), key=lambda it: it["case"]
    )
    used: set[str] = set()

    def pick(ok) -> dict[str, Any]:
        item = next(it for it in items if it["case"] not in used and ok(it))
        used.add(item["case"])
        return item

    if layout == "mosmed":
        good = pick(lambda it: "label" not in it and it["category"] == "CT-0")
        spare = pick(lambda it: "label" in it)  # MosMed validation holds the masked studies
    else:
        good, spare = pick(lambda it: _trainable(name, it)), pick(lambda it: _trainable(name, it))
    planted = {}
    # the most constrained first: defects that need a label (MosMed: a masked study), then the benign ones,
    # whose cases must be trainable, then the rest
    for defect in sorted(defects, key=lambda d: (len(eligible_cases(layout, data_dir, d)), d not in BENIGN_DEFECTS)):
        eligible = set(eligible_cases(layout, data_dir, defect))
        needs_training = defect in BENIGN_DEFECTS
        item = pick(partial(_plantable, name, eligible, needs_training))
        paths = plant_defect(layout, data_dir, _planting_id(layout, item), defect, seed=1, min_size=spec.min_size)
        planted[defect] = (item, paths)
    bundle_dir = os.path.join(REPO_ROOT, "bundles", spec.folder)
    prepared = Prepared(name, bundle_dir, data_dir, os.path.join(root, "work"), good, spare, planted)
    prepared.stages = {s["name"]: s for s in load_pipeline(bundle_dir)["stages"]}
    header = {k: v for k, v in clean.items() if not isinstance(v, list)}
    fatal = [item for d, (item, _) in planted.items() if d not in BENIGN_DEFECTS]
    lists = {
        "inference": {"training": [], "validation": [], "testing": [good] + [it for it, _ in planted.values()]},
        "fatal_training": {  # masked MosMed studies belong in validation; require_valid_datalist checks both
            "training": [good] + [it for it in fatal if layout != "mosmed" or "label" not in it],
            "validation": [spare] + [it for it in fatal if layout == "mosmed" and "label" in it],
            "testing": [],
        },
        "benign_training": {
            "training": [good] + [planted[d][0] for d in BENIGN_DEFECTS],
            "validation": [spare],
            "testing": [],
        },
    }
    for key, lists_ in lists.items():
        path = os.path.join(root, f"datalist_{key}.json")
        save_datalist({**header, **lists_}, path)
        prepared.datalists[key] = path
    return prepared


def _network_checkpoint(bundle_dir: str, path: str) -> str:
    """A checkpoint of the inference network in its test size (inference is checked, not accuracy)."""
    parser = _inference_parser(bundle_dir)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _inference_parser(bundle_dir: str, **overrides: Any) -> ConfigParser:
    """The bundle's inference config with the test profile's network and grid, and ``overrides``."""
    stage = next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == "inference")
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser.update({**stage_overrides(stage, "test"), **overrides})
    return parser


def _run(prepared: Prepared, stage_name: str, datalist: str, label: str, **extra: Any) -> Run:
    """Run a stage as a user does (pipeline.py's command line), keeping stdout and stderr apart."""
    stage = prepared.stages[stage_name]
    out_dir, ckpt_dir = os.path.join(prepared.work, label, "out"), os.path.join(prepared.work, label, "ckpt")
    overrides = {
        "dataset_dir": prepared.data_dir,
        "data_list_file_path": datalist,
        "output_dir": out_dir,
        "ckpt_dir": ckpt_dir,
        "device": "cpu",
        **stage_overrides(stage, "test"),
        **extra,
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        stage_command(stage, overrides),
        cwd=prepared.bundle_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, out_dir, ckpt_dir)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Callable[[str], Prepared]:
    cache: dict[str, Prepared] = {}

    def get(name: str) -> Prepared:
        if name not in cache:
            cache[name] = _prepare(name, str(tmp_path_factory.mktemp(f"bad_{name}")))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def inference_runs(prepared) -> Callable[[str], Run]:
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            p = prepared(name)
            os.makedirs(p.work, exist_ok=True)
            ckpt = _network_checkpoint(p.bundle_dir, os.path.join(p.work, "random_init.pt"))
            cache[name] = _run(p, "inference", p.datalists["inference"], "inference", ckpt_path=ckpt)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def fatal_training_runs(prepared) -> Callable[[str], Run]:
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            p = prepared(name)
            cache[name] = _run(p, BUNDLES[name].train_stages[0], p.datalists["fatal_training"], "fatal_training")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def benign_training_runs(prepared) -> Callable[[str], Run]:
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            p = prepared(name)
            for stage in BUNDLES[name].train_stages:  # COVID: the GAN, its pseudo-masks, then the TransUNet
                cache[name] = _run(p, stage, p.datalists["benign_training"], "benign_training")
                if cache[name].returncode != 0:
                    break
        return cache[name]

    return get


def _image_files(item: dict[str, Any], data_dir: str) -> set[str]:
    keys = ("mri", "pet") if "mri" in item else ("image",)
    files = [f for k in keys for f in (item[k] if isinstance(item[k], list) else [item[k]])]
    return {os.path.join(data_dir, *f.split("/")) for f in files}


def _outputs_of(run: Run, case: str) -> list[str]:
    if not os.path.isdir(run.output_dir):
        return []
    return sorted(f for f in os.listdir(run.output_dir) if f.startswith(f"{case}_"))


def _expected_output(prepared: Prepared, item: dict[str, Any]) -> tuple[str, str]:
    """(output file, the input file whose grid it must be on), from the inference stage's ``outputs``."""
    outputs = prepared.stages["inference"]["outputs"]
    ref = item[outputs.get("reference", "image")]
    ref = ref[0] if isinstance(ref, list) else ref
    return outputs["pattern"].format(**item), os.path.join(prepared.data_dir, *ref.split("/"))


def _assert_written_on_input_grid(prepared: Prepared, run: Run, item: dict[str, Any]) -> None:
    name, reference = _expected_output(prepared, item)
    path = os.path.join(run.output_dir, name)
    assert os.path.isfile(path), f"no {name}; log:\n{run.stdout[-3000:]}"
    out, ref = nib.load(path), nib.load(reference)
    assert out.shape[:3] == ref.shape[:3]
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
    assert np.isfinite(np.asarray(out.dataobj, dtype=np.float32)).all()


# ------------------------------------------------------------------------------------------- inference


def _skipped_in_summary(run: Run) -> list[str]:
    """The ``<case>: <reason>`` lines of the final error listing the skipped cases (empty when there is none)."""
    lines = run.stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if re.match(r"error: .*: \d+ of \d+ cases skipped", line)), None)
    return [] if first is None else lines[first + 1 :]


@pytest.mark.slow
@pytest.mark.parametrize("name, defect", COMBINATIONS)
def test_inference_skips_or_handles_each_defect(name, defect, prepared, inference_runs):
    p, run = prepared(name), inference_runs(name)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    item, paths = p.planted[defect]
    damaged_images = set(paths) & _image_files(item, p.data_dir)
    case = f"{item['subject']}/{item['case']}" if "subject" in item else item["case"]  # as the check names it
    warnings = [line for line in run.stdout.splitlines() if f"skipping case {case}: " in line]
    if defect in BENIGN_DEFECTS or not damaged_images:  # benign, or only the label is bad: inference reads no label
        assert not warnings, warnings
        _assert_written_on_input_grid(p, run, item)
    else:
        assert len(warnings) == 1, run.stdout[-3000:]
        named = [f for f in damaged_images if f"{f}: " in warnings[0]]
        assert named and re.search(PROBLEM_WORDS[defect], warnings[0].split(named[0], 1)[1]), warnings[0]
        assert _outputs_of(run, item["case"]) == []
        assert [line for line in _skipped_in_summary(run) if line.startswith(f"{item['case']}: ")] == [
            f"{item['case']}: {warnings[0].split(f'skipping case {case}: ', 1)[1]}"
        ]


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_inference_writes_good_case_and_leaves_no_partial_file(name, prepared, inference_runs):
    p, run = prepared(name), inference_runs(name)
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr
    _assert_written_on_input_grid(p, run, p.good)
    assert not [f for f in os.listdir(run.output_dir) if ".partial-" in f]
    skipped = _skipped_in_summary(run)
    testing = len(p.planted) + 1
    assert re.search(
        rf"error: {re.escape(run.output_dir)}: {len(skipped)} of {testing} cases skipped, the other "
        rf"{testing - len(skipped)} written:",
        run.stderr,
    ), run.stderr[-3000:]
    assert skipped and run.stderr.rstrip().endswith(skipped[-1])


@pytest.mark.parametrize("name", BUNDLES)
def test_inference_without_any_good_case_is_one_clear_error(name, prepared, tmp_path):
    p = prepared(name)
    with open(p.datalists["inference"]) as f:
        datalist = json.load(f)
    bad = {
        it["case"]
        for d, (it, paths) in p.planted.items()
        if d not in BENIGN_DEFECTS and set(paths) & _image_files(it, p.data_dir)
    }
    datalist["testing"] = [it for it in datalist["testing"] if it["case"] in bad]
    path = str(tmp_path / "only_bad.json")
    save_datalist(datalist, path)
    parser = ConfigParser()
    parser.read_config(os.path.join(p.bundle_dir, "configs", "inference.json"))
    parser.update({"dataset_dir": p.data_dir, "data_list_file_path": path})
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("datalist")
    message = data_error_message(err.value)
    assert message is not None and "no usable case" in message and "\n" not in message


@pytest.mark.parametrize("name", BUNDLES)
def test_an_empty_testing_list_says_so_and_how_to_run_on_another_list_or_on_files(name, tmp_path):
    keys = ("mri", "pet") if BUNDLES[name].layout == "adni_pairs" else ("image",)
    path = str(tmp_path / "datalist.json")
    training = [{"case": "a", **{k: f"a_{k}.nii.gz" for k in keys}}]
    save_datalist({"layout": BUNDLES[name].layout, "training": training, "validation": [], "testing": []}, path)
    parser = _inference_parser(os.path.join(REPO_ROOT, "bundles", BUNDLES[name].folder))
    parser.update({"dataset_dir": str(tmp_path), "data_list_file_path": path})
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("datalist")
    message = data_error_message(err.value)
    assert message is not None and message.startswith(f"{path}: the datalist's 'testing' list is empty"), message
    assert "another list of this datalist (it has 'training') with --inference_list <name>" in message
    assert (
        "files of your own with --datalist \"[{'case': 'my_case', "
        + ", ".join(f"'{k}': '/path/{k}.nii.gz'" for k in keys)
        in message
    )


@pytest.mark.parametrize("name", BUNDLES)
def test_a_missing_checkpoint_names_the_training_command_that_writes_it(name, tmp_path):
    bundle_dir = os.path.join(REPO_ROOT, "bundles", BUNDLES[name].folder)
    missing = str(tmp_path / "runs" / "checkpoints" / "model.pt")
    loader = _inference_parser(bundle_dir, ckpt_path=missing, device="cpu").get_parsed_content("handlers#0")
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 1
    with pytest.raises(DataError) as err:
        loader(engine)
    command = "python -m monai.bundle run training --config_file configs/train.json"
    assert str(err.value).startswith(f"{missing}: checkpoint file not found: it is written by `{command} ")
    assert f"--ckpt_dir {os.path.dirname(missing)}`" in str(err.value)


def _chest_ct_without_lungs(ct: np.ndarray) -> np.ndarray:
    """The CT with its lungs filled with soft tissue (40 HU), air left only in a one-voxel frame around the body."""
    out = np.where(ct < -320, 40, ct).astype(np.int16)
    out[[0, -1], :, :] = -1000
    out[:, [0, -1], :] = -1000
    return out


@pytest.mark.slow
def test_a_problem_found_by_a_transform_skips_that_case_and_the_others_are_written(tmp_path):
    """COVID inference on files of one's own (``--datalist``): a CT whose lungs cannot be found and a CT under the
    32 x 32 in-plane matrix of a chest CT pass no integrity check first (none runs on such a list) and fail inside
    the lung preprocessing; each is skipped with one line, the good CT is written, exit status 2 lists both."""
    spec = BUNDLES["covid"]
    bundle_dir = os.path.join(REPO_ROOT, "bundles", spec.folder)
    data = str(tmp_path / "data")
    write_synthetic_dataset(spec.layout, data, num_cases=5, shape=spec.shape, seed=0, progress=False)
    good = build_datalist(spec.layout, data, seed=0, progress=False)["training"][0]
    good_path = os.path.join(data, good["image"])
    img = nib.load(good_path)
    ct = np.asarray(img.dataobj)
    own = {"no_lung": _chest_ct_without_lungs(ct), "tiny": ct[16:40, 16:40, :]}  # 24 x 24 in-plane
    items = [{"case": "good", "image": good_path}]
    for case, array in own.items():
        items.append({"case": case, "image": save_nifti(array, img.affine, str(tmp_path / f"{case}.nii.gz"), np.int16)})
    out = str(tmp_path / "out")
    overrides = {
        "datalist": repr(items),  # as a user types it: --datalist "[{'case': ..., 'image': ...}, ...]"
        "output_dir": out,
        "ckpt_path": _network_checkpoint(bundle_dir, str(tmp_path / "random_init.pt")),
        "device": "cpu",
        **stage_overrides(next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == "inference"), "test"),
    }
    stage = next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == "inference")
    proc = subprocess.run(
        stage_command(stage, overrides),
        cwd=bundle_dir,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    run = Run(proc.returncode, proc.stdout, proc.stderr, out, "")
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr, run.stdout[-3000:] + run.stderr
    problems = {"no_lung": "no lung found", "tiny": r"CT volume too small: shape \(16, 24, 24\)"}
    for case, problem in problems.items():
        path = str(tmp_path / f"{case}.nii.gz")
        lines = [line for line in run.stdout.splitlines() if f"skipping case {case}: " in line]
        assert len(lines) == 1 and re.search(f"skipping case {case}: {re.escape(path)}: {problem}", lines[0]), lines
        assert _outputs_of(run, case) == []
    assert [line.split(":")[0] for line in _skipped_in_summary(run)] == ["no_lung", "tiny"]
    assert f"error: {out}: 2 of 3 cases skipped, the other 1 written:" in run.stderr
    written = nib.load(os.path.join(out, "good_seg.nii.gz"))
    assert written.shape == img.shape and np.allclose(written.affine, img.affine, atol=1e-4)


def test_medsegdiff_writes_mask_mean_and_uncertainty_as_a_set(tmp_path):
    bundle_dir = os.path.join(REPO_ROOT, "bundles", BUNDLES["medsegdiff"].folder)
    writers = _inference_parser(bundle_dir, output_dir=str(tmp_path)).get_parsed_content("writers")
    pred = MetaTensor(torch.ones(1, 8, 8, 8), affine=torch.eye(4))
    writers({"case": "a", "pred": pred, "pred_mean": pred, "pred_uncertainty": pred})
    assert sorted(os.listdir(tmp_path)) == ["a_mean.nii.gz", "a_seg.nii.gz", "a_uncertainty.nii.gz"]
    with pytest.raises(RuntimeError):  # the last output cannot be written: neither are the first two
        writers({"case": "b", "pred": pred, "pred_mean": pred, "pred_uncertainty": torch.ones(1, 8, 8, 8)})
    assert sorted(os.listdir(tmp_path)) == ["a_mean.nii.gz", "a_seg.nii.gz", "a_uncertainty.nii.gz"]


def test_dc2fusion_writes_the_fused_volume_and_its_panel_as_a_set(tmp_path, monkeypatch):
    spec = BUNDLES["dc2fusion"]
    bundle_dir = os.path.join(REPO_ROOT, "bundles", spec.folder)
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    write_synthetic_dataset(spec.layout, data, num_cases=2, shape=spec.shape, seed=0, progress=False)
    item = build_datalist(spec.layout, data, seed=0, progress=False)["training"][0]
    parser = _inference_parser(bundle_dir, output_dir=out)
    case = parser.get_parsed_content("preprocessing")(
        {**item, "mri": os.path.join(data, item["mri"]), "pet": os.path.join(data, item["pet"])}
    )
    case["pred"] = case["image"][:1].clone()  # what the network returns: one channel on the input grid
    postprocessing = parser.get_parsed_content("postprocessing")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("common.data.writers.save_nifti", disk_full)  # the fused NIfTI, written after the panel
    with pytest.raises(RuntimeError, match="applying transform"):
        postprocessing(dict(case))
    assert not os.path.exists(out) or os.listdir(out) == []  # no panel without its fused volume
    monkeypatch.undo()
    postprocessing(dict(case))
    assert sorted(os.listdir(out)) == [f"{item['case']}_fused.nii.gz", f"{item['case']}_panel.png"]


# ------------------------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("name, defect", FATAL)
def test_training_refuses_each_fatal_defect_naming_file_and_problem(name, defect, prepared, fatal_training_runs):
    p, run = prepared(name), fatal_training_runs(name)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    item, paths = p.planted[defect]
    lines = [line for line in run.stderr.splitlines() if any(f"{path}: " in line for path in paths)]
    assert len(lines) == 1, run.stderr
    path = next(path for path in paths if f"{path}: " in lines[0])
    assert re.search(PROBLEM_WORDS[defect], lines[0].split(f"{path}: ", 1)[1]), lines[0]


def _training_configs(name: str) -> list[pytest.param]:
    configs = os.path.join(REPO_ROOT, "bundles", BUNDLES[name].folder, "configs")
    found = [
        [c] for c in ("train.json", "train_gan.json", "pseudo_masks.json") if os.path.isfile(os.path.join(configs, c))
    ]
    found += [["train.json", c] for c in ("multi_gpu_train.json", "evaluate.json")]
    return [
        pytest.param(name, files, id=f"{name}-{'+'.join(f.removesuffix('.json') for f in files)}") for files in found
    ]


@pytest.fixture
def keep_process_hooks():
    """``initialize`` installs the data-error hook; undo it in this process afterwards."""
    hook, factory = sys.excepthook, logging.getLogRecordFactory()
    yield
    sys.excepthook = hook
    logging.setLogRecordFactory(factory)


@pytest.mark.parametrize("name, files", [p for name in BUNDLES for p in _training_configs(name)])
def test_every_training_config_checks_its_data_first(name, files, prepared, keep_process_hooks):
    """Every config that trains (or evaluates, or makes COVID pseudo-masks) refuses bad data in ``initialize``."""
    p = prepared(name)
    overrides = {
        "bundle_root": p.bundle_dir,
        "dataset_dir": p.data_dir,
        "data_list_file_path": p.datalists["fatal_training"],
        "evaluate_list": "training",  # evaluate.json checks the list it evaluates
    }
    workflow = ConfigWorkflow(
        config_file=[os.path.join(p.bundle_dir, "configs", f) for f in files], workflow_type=None, **overrides
    )
    with pytest.raises(RuntimeError) as err:
        workflow.initialize()
    message = data_error_message(err.value)
    assert message is not None and "data problem(s)" in message
    one_list = files[-1] in ("evaluate.json", "pseudo_masks.json")  # they check the one list they read
    with open(p.datalists["fatal_training"]) as f:
        datalist = json.load(f)
    checked = {it["case"] for key in (["training"] if one_list else ["training", "validation"]) for it in datalist[key]}
    fatal = [(item, paths) for d, (item, paths) in p.planted.items() if d not in BENIGN_DEFECTS]
    assert all(any(path in message for path in paths) for item, paths in fatal if item["case"] in checked)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_refused_training_is_one_line_per_problem_and_writes_nothing(name, prepared, fatal_training_runs):
    p, run = prepared(name), fatal_training_runs(name)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    count = int(re.search(r"(\d+) data problem", lines[first]).group(1))
    assert count >= sum(d not in BENIGN_DEFECTS for d in p.planted)
    assert len(lines) - first == 1 + count  # the error line, then one line per problem, nothing after
    assert all(line.count(": ") >= 2 for line in lines[first + 1 :])  # "<case>: <file>: <problem>"
    for folder in (run.output_dir, run.ckpt_dir):  # failed before any model, checkpoint or log was made
        assert not os.path.exists(folder) or os.listdir(folder) == []


@pytest.mark.slow
@pytest.mark.parametrize("name, defect", BENIGN)
def test_training_works_on_each_benign_defect(name, defect, prepared, benign_training_runs):
    p, run = prepared(name), benign_training_runs(name)
    with open(p.datalists["benign_training"]) as f:
        assert p.planted[defect][0] in json.load(f)["training"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "skipping case" not in run.stdout and "Traceback" not in run.stderr
    checkpoint = os.path.join(run.ckpt_dir, "model.pt")
    assert os.path.isfile(checkpoint) and torch.load(checkpoint, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- outputs


def test_a_case_failing_while_written_leaves_nothing(tmp_path, monkeypatch):
    target = str(tmp_path / "case_seg.nii.gz")

    def fail_half_way(img, filename):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), target)
    assert os.listdir(tmp_path) == []


def test_a_killed_writer_leaves_no_output_and_rewriting_cleans_up(tmp_path):
    target = str(tmp_path / "case_seg.nii.gz")
    script = (
        "import sys, time, nibabel as nib\n"
        "from common.data.writers import save_nifti\n"
        "def slow(img, filename):\n"
        "    open(filename, 'wb').write(b'half')\n"
        "    time.sleep(60)\n"
        "nib.save = slow\n"
        "import numpy as np\n"
        f"save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), {target!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not partial_files(target) or os.path.getsize(partial_files(target)[0]) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(target) and len(partial_files(target)) == 1  # killed: only the hidden temporary
    save_nifti(np.ones((4, 4, 4), np.uint8), np.eye(4), target)  # the case is run again
    assert os.listdir(tmp_path) == ["case_seg.nii.gz"] and nib.load(target).get_fdata().sum() == 64
