"""Tests of the DC2Fusion bundle (bundles/adni_mri_pet_dc2fusion) beyond the shared harness: the paper's training
settings as wired in the configs, the inputs the network sees, inference aligned with the MRI, bad pairs rejected,
the evaluation table, and multi-GPU training with torchrun on CPU."""

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
from monai.data import MetaTensor
from scipy import ndimage

from common.data.datalist import build_datalist, save_datalist
from common.data.decathlon import load_datalist
from common.data.synthetic.write import write_synthetic_dataset
from common.engines.fusion_evaluation import FusionMetricsSaver
from common.errors import DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLE = os.path.join(REPO_ROOT, "bundles", "adni_mri_pet_dc2fusion")
TINY = {
    "pad_size": [33, 33, 33],
    "roi_size": [32, 32, 32],
    "num_workers": 0,
    "network_def#embed_dim": 8,
    "network_def#depths": [1, 1],
    "network_def#num_heads": [1, 2],
    "network_def#conv_kernel_size": 3,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    """Two synthetic ADNI subjects at 32^3; both train and validate, the first is the test case."""
    root = tmp_path_factory.mktemp("adni")
    dataset_dir = str(root / "adni_pairs")
    write_synthetic_dataset("adni_pairs", dataset_dir, num_cases=2, shape=(32, 32, 32), seed=0, progress=False)
    datalist = build_datalist("adni_pairs", dataset_dir, val_fraction=0.0, test_fraction=0.0, progress=False)
    datalist["validation"] = list(datalist["training"])
    datalist["testing"] = datalist["training"][:1]
    path = str(root / "datalist.json")
    save_datalist(datalist, path)
    return dataset_dir, path


def _parser(files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", f) for f in files])
    parser.update({"bundle_root": BUNDLE, **TINY, **overrides})
    return parser


def test_training_settings_are_the_papers(data):
    dataset_dir, datalist = data
    parser = _parser(["train.json"], dataset_dir=dataset_dir, data_list_file_path=datalist, device="cpu")
    loss = parser.get_parsed_content("loss")
    assert [loss.weights[t] for t in ("lncc_mri", "lncc_pet", "ssim_mri", "ssim_pet", "l1_mri", "l1_pet")] == [
        2.0, 1.0, 2.0, 1.0, 2.0, 1.0
    ]  # fmt: skip
    assert parser.get_parsed_content("seed") == 3407 and parser.get_parsed_content("batch_size") == 1
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    scheduler = parser.get_parsed_content("lr_scheduler")
    epochs = parser.get_parsed_content("epochs")
    assert epochs == 500
    for epoch in range(1, 4):
        optimizer.step()  # no gradients: parameters unchanged, but the scheduler sees the usual order
        scheduler.step()  # LrScheduleHandler steps once per epoch
        expected = 1e-4 * (1 - epoch / epochs) ** 0.9
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)


def test_network_sees_both_sources_scaled_and_the_loss_gets_them_as_label(data):
    dataset_dir, datalist = data
    parser = _parser(["train.json"], dataset_dir=dataset_dir, data_list_file_path=datalist)
    item = parser.get_parsed_content("validate#preprocessing")(load_datalist(datalist, "validation", dataset_dir)[0])
    image = item["image"]
    assert image.shape == (2, 32, 32, 32)
    assert torch.equal(item["label"], image)  # the unsupervised loss compares the output with the sources
    for channel in (0, 1):
        assert image[channel].min() == 0.0 and image[channel].max() == pytest.approx(1.0)
    # cropped to the MRI foreground, padded symmetrically to 224 mm (33 voxels here), resized to 32: the brain is
    # centred and spans most of the grid along its longest (anterior-posterior) axis
    nonzero = torch.nonzero(image[0] > 0)
    low, high = nonzero.min(0).values, nonzero.max(0).values
    assert high[1] - low[1] + 1 >= 0.7 * 32
    assert torch.all((low - (31 - high)).abs() <= 2)


def test_inference_output_is_on_the_mri_grid_and_inverts_the_preprocessing(data, tmp_path):
    """With the MRI channel as the 'fused' volume, the written file must reproduce the MRI voxel by voxel."""
    dataset_dir, datalist = data
    parser = _parser(
        ["inference.json"], dataset_dir=dataset_dir, data_list_file_path=datalist, output_dir=str(tmp_path)
    )
    raw = load_datalist(datalist, "testing", dataset_dir)[0]
    item = parser.get_parsed_content("preprocessing")(raw)
    item["pred"] = MetaTensor(item["image"][:1].as_tensor().clone())
    parser.get_parsed_content("postprocessing")(item)

    written = nib.load(str(tmp_path / f"{raw['case']}_fused.nii.gz"))
    mri = nib.load(raw["mri"])
    assert written.shape == mri.shape
    np.testing.assert_allclose(written.affine, mri.affine, atol=1e-4)
    fused, reference = np.asarray(written.dataobj), np.asarray(mri.dataobj)
    brain = reference > 0
    near_brain = ndimage.binary_dilation(brain, iterations=2)  # resizing blurs the edge by a voxel or two
    assert fused[~near_brain].max() < 0.02 * fused.max()  # background stays background
    assert np.corrcoef(fused[brain], reference[brain])[0, 1] > 0.9  # same anatomy at the same voxels
    assert os.path.isfile(tmp_path / f"{raw['case']}_panel.png")


def test_inference_rejects_a_pet_on_another_grid(data, tmp_path):
    dataset_dir, datalist = data
    raw = dict(load_datalist(datalist, "testing", dataset_dir)[0])
    pet = nib.load(raw["pet"])
    bad = str(tmp_path / "pet_cropped.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(pet.dataobj)[:-2], pet.affine), bad)
    raw["pet"] = bad
    preprocessing = _parser(
        ["inference.json"], dataset_dir=dataset_dir, data_list_file_path=datalist
    ).get_parsed_content("preprocessing")
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the transform's error
        preprocessing(raw)
    cause = err.value.__cause__
    assert isinstance(cause, DataError) and cause.path == bad and "register the pair" in str(cause)


def test_evaluation_scores_the_network_and_the_four_baselines(data, tmp_path):
    dataset_dir, datalist = data
    parser = _parser(
        ["train.json", "evaluate.json"],
        dataset_dir=dataset_dir,
        data_list_file_path=datalist,
        output_dir=str(tmp_path),
        ckpt_path=str(tmp_path / "model.pt"),
    )
    savers = [h for h in parser.get_parsed_content("validate#handlers") if isinstance(h, FusionMetricsSaver)]
    assert len(savers) == 1
    saver = savers[0]
    assert saver.method_name == "dc2fusion" and saver.baselines == ("average", "maximum", "laplacian_pyramid", "guided_filter")
    assert saver.protocols == ("volume", "slice") and saver.summary_path == str(tmp_path / "summary.json")
    assert parser.get_parsed_content("evaluate_list") == "testing"


def test_multi_gpu_train_runs_one_epoch_with_torchrun_on_cpu(data, tmp_path):
    dataset_dir, datalist = data
    overrides = {
        **TINY,
        "dataset_dir": dataset_dir,
        "data_list_file_path": datalist,
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(tmp_path / "ckpt"),
        "epochs": 1,
        "val_interval": 1,
        "cache_rate": 0.0,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "training", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]  # fmt: skip
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(tmp_path / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
    network = _parser(["train.json"]).get_parsed_content("network_def")
    network.load_state_dict(state)  # a plain state dict of network_def, not of the DDP wrapper
    assert "Epoch[1] Complete" in proc.stdout + proc.stderr
