"""Bundle-specific checks of bundles/covid_ct_gan_transunet_segmentation (the harness runs its whole pipeline)."""

from __future__ import annotations

import json
import os

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from common.bundle.pipeline import load_pipeline, stage_overrides
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_mosmed
from common.errors import DataError

BUNDLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "bundles",
    "covid_ct_gan_transunet_segmentation",
)


def config(*names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(BUNDLE, "configs", n) for n in names])
    return parser


def test_stages_that_share_a_network_define_it_alike():
    assert config("train.json")["network_def"] == config("inference.json")["network_def"]
    assert config("train_gan.json")["network_def"] == config("pseudo_masks.json")["network_def"]
    for key in ("hu_window",):
        values = {
            json.dumps(config(n)[key]) for n in ("train_gan.json", "pseudo_masks.json", "train.json", "inference.json")
        }
        assert len(values) == 1, key
    assert (
        config("train_gan.json")["roi_size"]
        == config("pseudo_masks.json")["roi_size"]
        == config("inference.json")["roi_size"]
    )
    # the TransUNet stages read their grid from the pseudo-mask stage's slice classes; trained by MONAI Label on
    # annotated studies (no datalist, no slice classes) the TransUNet uses the inference grid
    assert config("train.json")["roi_size"] == "$slice_classes_grid(@slice_classes, @default_roi_size)"
    assert config("train.json")["default_roi_size"] == config("inference.json")["roi_size"]


def test_pipeline_profiles_give_every_stage_of_a_network_the_same_sizes():
    stages = {s["name"]: s for s in load_pipeline(BUNDLE)["stages"]}
    for profile in ("test", "demo"):

        def nets(name: str, profile: str = profile) -> dict:
            return {k: v for k, v in stage_overrides(stages[name], profile).items() if k.startswith("network_def")}

        assert nets("train") == nets("evaluate") == nets("inference") != {}
        assert nets("train_gan") == nets("pseudo_masks") != {}
        grid = stage_overrides(stages["train_gan"], profile)["roi_size"]
        assert stage_overrides(stages["pseudo_masks"], profile)["roi_size"] == grid
        assert stage_overrides(stages["inference"], profile)["roi_size"] == grid
        assert nets("train")["network_def#img_size"] == grid[-1]
    assert [s["name"] for s in stages.values() if s.get("trains")] == ["train_gan", "train"]


def test_multi_gpu_config_wraps_the_transunet_for_its_two_phases():
    parser = config("train.json", "multi_gpu_train.json")
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["network"]["find_unused_parameters"] is True  # the projection head is idle in the segmentation phase
    assert parser["train"]["contrastive_sampler"]["rank"] == "$dist.get_rank()"
    assert "$import torch.distributed as dist" in parser["imports"]
    # the learning-rate schedule steps on every rank, the other validation handlers on rank 0 only
    assert "[@validate#lr_handler]" in parser["validate"]["evaluator"]["val_handlers"]


@pytest.fixture(scope="module")
def leaky_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosmed")
    write_mosmed(str(root), shape=(32, 32, 16), seed=0, progress=False, category_counts={0: 2, 1: 4})
    datalist = build_datalist("mosmed", root, val_fraction=0.25, test_fraction=0.25, check_data=False, progress=False)
    masked = next(it for it in datalist["validation"] + datalist["testing"] if "label" in it)
    for list_name in ("validation", "testing"):
        datalist[list_name] = [it for it in datalist[list_name] if it["case"] != masked["case"]]
    datalist["training"].append({k: v for k, v in masked.items() if k != "label"})  # label dropped, mask on disk
    path = str(root / "leaky_datalist.json")
    save_datalist(datalist, path)
    return str(root), path, masked["case"]


@pytest.mark.parametrize("config_file", ["train_gan.json", "pseudo_masks.json", "train.json"])
def test_training_stages_refuse_a_datalist_that_leaks_a_masked_study(leaky_dataset, tmp_path, config_file):
    root, datalist, case = leaky_dataset
    cwd = os.getcwd()
    os.chdir(BUNDLE)
    try:
        wf = ConfigWorkflow(
            config_file=os.path.join("configs", config_file),
            workflow_type="train" if config_file != "pseudo_masks.json" else None,
            dataset_dir=root,
            data_list_file_path=datalist,
            output_dir=str(tmp_path),
            ckpt_dir=str(tmp_path),
        )
        with pytest.raises(RuntimeError) as err:
            wf.initialize()
    finally:
        os.chdir(cwd)
    cause = err.value
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    assert isinstance(cause, DataError) and f"training study {case} has a mask" in str(cause)


TINY_UNET = {
    "network_def#img_size": 32,
    "network_def#stem_channels": 8,
    "network_def#encoder_channels": [16, 32, 64],
    "network_def#vit_layers": 1,
    "network_def#vit_heads": 2,
    "network_def#vit_mlp_dim": 32,
    "network_def#hidden_size": 16,
    "network_def#head_channels": 16,
    "network_def#decoder_channels": [16, 8, 8, 4],
    "network_def#proj_dim": 8,
    "batch_size": 8,
    "contrastive_batch_size": 8,
    "epochs": 1,
    "num_workers": 0,
}


@pytest.mark.parametrize("selection", ["final", "validation"])
def test_final_model_selection_trains_without_reading_a_reference_mask(tmp_path, selection):
    """``model_selection="final"``: no validation, the last epoch saved as model.pt, and no reference mask read: the
    validation studies' masks point at missing files, which the default selection cannot train with."""
    from common.benchmarks.covid import _truth, write_label_dir

    root = str(tmp_path / "data")
    write_mosmed(root, shape=(48, 48, 16), seed=0, progress=False, category_counts={0: 2, 1: 5})
    datalist = build_datalist("mosmed", root, val_fraction=0.3, test_fraction=0.0, progress=False)
    labels = write_label_dir(
        datalist, root, str(tmp_path / "labels"), (16, 32, 32), lambda it, *_: _truth(root, it["case"])
    )
    for item in datalist["validation"]:
        item["label"] = "masks/missing_mask.nii.gz"
    path = str(tmp_path / "datalist.json")
    save_datalist(datalist, path)
    parser = config("train.json")
    ckpt = str(tmp_path / "ckpt")
    parser.update(
        {
            **TINY_UNET,
            "bundle_root": BUNDLE,
            "dataset_dir": root,
            "data_list_file_path": path,
            "pseudo_mask_dir": labels,
            "ckpt_dir": ckpt,
            "output_dir": str(tmp_path / "out"),
            "model_selection": selection,
        }
    )
    if selection == "validation":
        with pytest.raises(Exception) as err:
            parser.get_parsed_content("train#trainer").run()
        chain, cause = [], err.value
        while cause is not None:
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        assert any("missing_mask" in text for text in chain)
        return
    parser.get_parsed_content("initialize#1")  # check_model_selection accepts it
    parser.get_parsed_content("train#trainer").run()
    assert os.path.isfile(os.path.join(ckpt, "model.pt"))
    parser["model_selection"] = "Final"
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("initialize#1", lazy=False)
    assert "model_selection must be one of" in str(err.value.__cause__)
