"""The MedSegDiff bundle beyond the harness: its method settings, the DDPM/DDIM switch, the TC/WT/ET option and
multi-GPU training with torchrun on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_synthetic_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLE = os.path.join(REPO_ROOT, "bundles", "brats_mri_medsegdiff_segmentation")
TINY = {
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, True],
    "network_def#num_heads": 2,
    "network_def#norm_num_groups": 4,
    "network_def#ff_parser_size": [16, 16],
    "roi_size": [16, 16],
}


def _parser(config: str | list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    files = [config] if isinstance(config, str) else config
    parser.read_config([os.path.join(BUNDLE, "configs", f) for f in files])
    parser.read_meta(os.path.join(BUNDLE, "configs", "metadata.json"))
    parser.update(overrides)
    return parser


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory):
    """6 tiny synthetic BraTS 2021 cases: 2 training, 2 validation, 2 testing."""
    root = tmp_path_factory.mktemp("medsegdiff_data")
    data_dir = str(root / "brats")
    write_synthetic_dataset("brats2021", data_dir, num_cases=6, shape=(32, 32, 20), seed=3)
    datalist = str(root / "datalist.json")
    save_datalist(build_datalist("brats2021", data_dir, seed=3, val_fraction=0.34, test_fraction=0.34), datalist)
    return data_dir, datalist


def test_configs_hold_the_method_settings():
    train = _parser("train.json")
    ddpm = train.get_parsed_content("noise_scheduler")
    assert isinstance(ddpm, DDPMScheduler) and ddpm.num_train_timesteps == 1000 and ddpm.prediction_type == "epsilon"
    torch.testing.assert_close(ddpm.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    assert torch.allclose(ddpm.betas.diff(), ddpm.betas.diff()[0].expand(999), rtol=1e-3)  # linear
    assert train.get_parsed_content("loss").x0_weight == 0.0  # auxiliary x_0 loss off by default
    assert train["region_channels"] == [1]  # whole tumour (WT)
    infer = _parser("inference.json")
    inferer = infer.get_parsed_content("inferer")
    assert isinstance(inferer.scheduler, DDIMScheduler) and inferer.num_ensemble == 5 and inferer.spatial_dims == 2
    net = infer.get_parsed_content("network_def")
    meta = infer["_meta_"]["network_data_format"]
    assert meta["inputs"]["image"]["num_channels"] == net.in_channels + net.out_channels == 5
    assert meta["outputs"]["pred"]["num_channels"] == net.out_channels == 1
    for key in ("roi_size", "region_channels", "num_train_timesteps", "beta_start", "beta_end"):
        assert train[key] == infer[key], key  # train and inference agree
    # the same architecture; gradient checkpointing is a training-only memory switch (same weights and outputs)
    train_net = {k: v for k, v in train["network_def"].items() if k != "gradient_checkpointing"}
    assert train_net == infer["network_def"]
    assert not any(fusion.residual for fusion in net.fusions)  # the paper's attentive fusion A, not m_I + A
    assert inferer.batch_size == (64 if torch.cuda.is_available() else 2)  # small network calls on a CPU


def test_ddpm_sampling_is_a_config_change():
    ddpm = {"sampling_scheduler#_target_": "monai.networks.schedulers.DDPMScheduler"}
    inferer = _parser("inference.json", **ddpm, num_inference_steps=1000).get_parsed_content("inferer")
    assert isinstance(inferer.scheduler, DDPMScheduler) and inferer.num_inference_steps == 1000
    with pytest.raises(RuntimeError, match="DiffusionSegmentationInferer") as error:
        _parser("inference.json", **ddpm, num_inference_steps=50).get_parsed_content("inferer")
    assert "DDPMScheduler samples only" in str(error.value.__cause__)  # a strided DDPM chain would be wrong


def test_dpm_solver_is_a_config_change():
    from common.networks.dpm_solver import DPMSolverMultistepScheduler

    dpm = {"sampling_scheduler#_target_": "common.networks.dpm_solver.DPMSolverMultistepScheduler"}
    inferer = _parser("inference.json", **dpm, num_inference_steps=10).get_parsed_content("inferer")
    assert isinstance(inferer.scheduler, DPMSolverMultistepScheduler) and inferer.scheduler.clip_sample
    torch.testing.assert_close(inferer.scheduler.betas[[0, -1]], torch.tensor([1e-4, 0.02]))


def _run(parser: ConfigParser) -> None:
    """Run a parsed bundle config in this process (``initialize`` then ``run``), restoring the thread count."""
    threads = torch.get_num_threads()
    try:
        parser.get_parsed_content("initialize")
        parser.get_parsed_content("run")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        ("tc_wt_et_2d", {"region_channels": [0, 1, 2]}),
        ("wt_3d", {"roi_size": [16, 16, 16], "network_def#ff_parser_size": [16, 16, 16]}),
    ],
)
def test_options_train_and_infer(variant, options, brain_data, tmp_path, monkeypatch):
    """TC/WT/ET (3 mask channels, written back as a BraTS label map) and 3D (whole resized volumes)."""
    data_dir, datalist = brain_data
    common = {**TINY, **options, "dataset_dir": data_dir, "data_list_file_path": datalist, "num_threads": 1}
    common.update(device="cpu", fusion="mean", num_workers=0)
    monkeypatch.chdir(BUNDLE)
    train = _parser("train.json", **common, output_dir=str(tmp_path / "train"), ckpt_dir=str(tmp_path / "ckpt"))
    train.update(
        {"epochs": 1, "val_interval": 1, "batch_size": 2, "slices_per_volume": 2, "val_num_inference_steps": 2}
    )
    _run(train)
    assert train.get_parsed_content("network_def").spatial_dims == (3 if variant == "wt_3d" else 2)
    infer = _parser(
        "inference.json", **common, output_dir=str(tmp_path / "out"), ckpt_path=str(tmp_path / "ckpt" / "model.pt")
    )
    infer.update({"num_inference_steps": 2, "num_ensemble": 2})
    _run(infer)
    channels = len(common.get("region_channels", [1]))
    with open(datalist) as f:
        cases = json.load(f)["testing"]
    assert cases
    for item in cases:
        reference = nib.load(os.path.join(data_dir, item["image"][0]))
        seg = nib.load(str(tmp_path / "out" / f"{item['case']}_seg.nii.gz"))
        assert seg.shape == reference.shape and np.allclose(seg.affine, reference.affine, atol=1e-4)
        allowed = {0, 1, 2, 4} if channels == 3 else {0, 1}  # BraTS 2021 labels, or the binary WT mask
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= allowed
        spread = nib.load(str(tmp_path / "out" / f"{item['case']}_uncertainty.nii.gz"))
        assert spread.shape == (reference.shape if channels == 1 else (*reference.shape, channels))
        values = np.asarray(spread.dataobj)
        assert values.min() >= 0 and values.max() <= 0.5 + 1e-6


@pytest.mark.slow
def test_multi_gpu_train_runs_one_epoch_with_torchrun_on_cpu(brain_data, tmp_path):
    data_dir, datalist = brain_data
    overrides = {
        **TINY,
        "dataset_dir": data_dir,
        "data_list_file_path": datalist,
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "ckpt"),
        "epochs": 1,
        "batch_size": 1,
        "slices_per_volume": 2,
        "num_workers": 0,
        "val_interval": 1,
        "val_num_inference_steps": 2,
        "num_threads": 1,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "monai.bundle"]
    cmd += ["run", "training", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(tmp_path / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
    net = _parser("train.json", **TINY).get_parsed_content("network_def")
    net.load_state_dict(state)  # the EMA weights, a plain state_dict of network_def
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {"trainer", "network", "ema", "optimizer", "best_model"} <= set(last)  # the resumable state
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"]  # one whole epoch saved
