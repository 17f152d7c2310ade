"""HLWA-UNet bundle beyond the shared harness: multi-GPU config under torchrun (gloo, CPU), the MSD Task01 and
BraTS 2023 layouts end to end with labels read and outputs written in each dataset's own label convention, and
evaluation with a modality missing."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.bundle.pipeline import load_pipeline, run_stage, stage_overrides
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_synthetic_dataset

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "brats_mri_hlwa_segmentation",
)
STAGES = {s["name"]: s for s in load_pipeline(BUNDLE)["stages"]}


def _overrides(stage, data_dir, datalist, work, **extra):
    out = {
        "dataset_dir": data_dir,
        "data_list_file_path": datalist,
        "output_dir": os.path.join(work, stage),
        "ckpt_dir": os.path.join(work, "checkpoints"),
        "device": "cpu",
    }
    out.update(stage_overrides(STAGES[stage], "test"))
    out.update(extra)
    return out


def _dataset(tmp_path, layout, num_cases=4, val_fraction=0.25):
    data = str(tmp_path / layout)
    write_synthetic_dataset(layout, data, num_cases=num_cases, shape=(32, 32, 32), seed=3, progress=False)
    datalist = str(tmp_path / f"{layout}.json")
    save_datalist(
        build_datalist(layout, data, seed=0, val_fraction=val_fraction, test_fraction=0.2, progress=False), datalist
    )
    return data, datalist


@pytest.mark.slow
def test_torchrun_two_processes_train_one_epoch_on_cpu(tmp_path):
    # two validation cases: each rank validates one (DistributedSampler without padding keeps metrics exact)
    data, datalist = _dataset(tmp_path, "brats2021", num_cases=6, val_fraction=0.34)
    ov = _overrides("train", data, datalist, str(tmp_path), epochs=1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
    ]
    for k, v in ov.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Epoch[1] Complete" in log or "Epoch: 1/1" in log, log[-2000:]
    assert os.path.isfile(tmp_path / "checkpoints" / "model.pt")  # rank 0 validated and saved


#: label value -> (TC, WT, ET) of each convention, written out here rather than taken from common/data/labels.py
REGIONS_OF = {
    "msd_task01": {0: (0, 0, 0), 1: (0, 1, 0), 2: (1, 1, 0), 3: (1, 1, 1)},  # 1 edema, 2 non-enhancing, 3 enhancing
    "brats2023": {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 3: (1, 1, 1)},  # 1 necrotic core, 2 edema, 3 enhancing
}


def _component(parser: ConfigParser, transforms_id: str, target: str):
    """The parsed transform of ``transforms_id`` whose ``_target_`` is ``target``."""
    (index,) = [i for i, t in enumerate(parser.get(transforms_id)) if t["_target_"] == target]
    return parser.get_parsed_content(f"{transforms_id}#{index}")


def _assert_labels_in_their_own_convention(layout: str, data: str, datalist: str) -> None:
    """Training turns a case's label file into the TC/WT/ET regions the network learns, and inference turns regions
    back into label values, both in the layout's own convention (an edema/non-enhancing swap fails here)."""
    item = next(it for it in json.loads(open(datalist).read())["testing"] if "label" in it)
    label = np.asarray(nib.load(os.path.join(data, item["label"])).dataobj).astype(np.uint8)
    table = REGIONS_OF[layout]
    expected = np.stack([np.isin(label, [v for v, r in table.items() if r[c]]) for c in range(3)])
    assert expected[1].any() and (expected[1] & ~expected[0]).any() and (expected[0] & ~expected[2]).any()
    configs = {}
    for name in ("train", "inference"):
        configs[name] = ConfigParser()
        configs[name].read_config(os.path.join(BUNDLE, "configs", f"{name}.json"))
        configs[name].update({"dataset_dir": data, "data_list_file_path": datalist})
    to_regions = _component(configs["train"], "load_transforms", "common.data.labels.LabelsToRegionsd")
    regions = to_regions({"label": torch.as_tensor(label[None])})["label"]
    np.testing.assert_array_equal(np.asarray(regions).astype(bool), expected)
    to_labels = _component(configs["inference"], "postprocessing#transforms", "common.data.labels.RegionsToLabelsd")
    written = to_labels({"pred": torch.as_tensor(expected.astype(np.float32))})["pred"]
    np.testing.assert_array_equal(np.asarray(written)[0], label)


@pytest.mark.slow
def test_msd_and_brats2023_layouts_end_to_end(tmp_path):
    work = str(tmp_path / "work")
    msd, msd_list = _dataset(tmp_path, "msd_task01")
    run_stage(BUNDLE, STAGES["train"], _overrides("train", msd, msd_list, work), os.path.join(work, "train.log"))
    ckpt = os.path.join(work, "checkpoints", "model.pt")
    run_stage(
        BUNDLE,
        STAGES["evaluate"],
        _overrides("evaluate", msd, msd_list, work, ckpt_path=ckpt, drop_modality=1),
        os.path.join(work, "evaluate.log"),
    )
    summary = json.loads(open(os.path.join(work, "evaluate", "summary.json")).read())
    assert {"dice_TC", "dice_WT", "dice_ET", "mean_dice", "mean_hd95_mm", "mean_lesion_dice"} <= set(summary)
    for layout, data, datalist, allowed in [
        ("msd_task01", msd, msd_list, {0, 1, 2, 3}),
        ("brats2023", *_dataset(tmp_path, "brats2023"), {0, 1, 2, 3}),
    ]:
        _assert_labels_in_their_own_convention(layout, data, datalist)
        out_dir = os.path.join(work, f"pred_{layout}")
        run_stage(
            BUNDLE,
            STAGES["inference"],
            _overrides("inference", data, datalist, work, ckpt_path=ckpt, output_dir=out_dir),
            os.path.join(work, f"{layout}.log"),
        )
        for item in json.loads(open(datalist).read())["testing"]:
            image_path = item["image"] if isinstance(item["image"], str) else item["image"][0]
            image = nib.load(os.path.join(data, image_path))
            pred = nib.load(os.path.join(out_dir, f"{item['case']}_seg.nii.gz"))
            assert pred.shape == image.shape[:3]  # a 4D MSD input gives a 3D label map
            assert np.allclose(pred.affine, image.affine, atol=1e-4)
            assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= allowed
