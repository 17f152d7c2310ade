"""The harness catches what it promises to: each planted defect in a copy of the example bundle fails the check
that owns it, with a message naming the bundle and the problem; a training that does not learn fails it too."""

import json
import os
import shutil

import pytest
import torch

from common.bundle import checks
from common.bundle.pipeline import PipelineResult, prepare_data, run_pipeline

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_bundle")


@pytest.fixture
def bundle(tmp_path):
    dst = tmp_path / "broken_bundle"
    shutil.copytree(EXAMPLE, dst)
    return str(dst)


def _edit_json(path, fn):
    with open(path) as f:
        content = json.load(f)
    fn(content)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def test_clean_example_passes_static_checks():
    checks.check_required_files(EXAMPLE)
    checks.check_metadata(EXAMPLE)
    checks.check_interface(EXAMPLE)
    checks.check_net_in_out(EXAMPLE)


def test_metadata_that_breaks_the_schema(bundle):
    _edit_json(os.path.join(bundle, "configs/metadata.json"), lambda m: m.pop("task"))
    with pytest.raises(
        checks.BundleCheckError,
        match=r"broken_bundle: configs/metadata.json breaks the metadata "
        r"schema: .*'task' is a required property",
    ):
        checks.check_metadata(bundle)


def test_metadata_with_wrong_field_type(bundle):
    def wrong(m):
        m["network_data_format"]["inputs"]["image"]["num_channels"] = "four"

    _edit_json(os.path.join(bundle, "configs/metadata.json"), wrong)
    with pytest.raises(checks.BundleCheckError, match="breaks the metadata schema"):
        checks.check_metadata(bundle)


def test_output_channels_that_disagree_with_metadata(bundle):
    def two_channels(m):
        m["network_data_format"]["outputs"]["pred"]["num_channels"] = 2

    _edit_json(os.path.join(bundle, "configs/metadata.json"), two_channels)
    with pytest.raises(checks.BundleCheckError, match=r"output channel number `3` doesn't match: `2`"):
        checks.check_net_in_out(bundle)


def test_missing_files_and_unlisted_version(bundle):
    os.remove(os.path.join(bundle, "LICENSE"))
    with pytest.raises(checks.BundleCheckError, match="missing required files: LICENSE"):
        checks.check_required_files(bundle)
    shutil.copy(os.path.join(EXAMPLE, "LICENSE"), os.path.join(bundle, "LICENSE"))
    _edit_json(os.path.join(bundle, "configs/metadata.json"), lambda m: m.update(version="9.9.9"))
    with pytest.raises(checks.BundleCheckError, match="version '9.9.9' is not listed in 'changelog'"):
        checks.check_required_files(bundle)


def test_train_config_without_an_interface_key(bundle):
    _edit_json(os.path.join(bundle, "configs/train.json"), lambda c: c.pop("roi_size"))
    with pytest.raises(checks.BundleCheckError, match=r"configs/train.json lacks \['roi_size'\]"):
        checks.check_interface(bundle)


def test_inference_that_changes_the_affine(bundle, tmp_path):
    """Drop the inverse transform (and the crop, so the shape still agrees): outputs stay in RAS, inputs are not."""

    def no_inverse(c):
        c["preprocessing"]["transforms"] = [
            t for t in c["preprocessing"]["transforms"] if t["_target_"] != "CropForegroundd"
        ]
        c["postprocessing"]["transforms"] = [t for t in c["postprocessing"]["transforms"] if t["_target_"] != "Invertd"]

    _edit_json(os.path.join(bundle, "configs/inference.json"), no_inverse)
    work = tmp_path / "work"
    prepare_data(bundle, str(work / "data"))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs/inference.json"))
    os.makedirs(work / "checkpoints")
    torch.save(parser.get_parsed_content("network_def").state_dict(), work / "checkpoints" / "model.pt")
    result = run_pipeline(bundle, str(work), stages=["inference"])
    with pytest.raises(checks.BundleCheckError, match="affine differs from the input's"):
        checks.check_inference_outputs(bundle, result)


def test_broken_pipeline_stage_names_the_stage(bundle, tmp_path):
    _edit_json(os.path.join(bundle, "configs/inference.json"), lambda c: c.update(run=["$undefined_name.run()"]))
    work = tmp_path / "work"
    os.makedirs(work / "checkpoints")
    torch.save({}, work / "checkpoints" / "model.pt")
    with pytest.raises(Exception, match=r"bundle broken_bundle, stage 'inference' exited with"):
        run_pipeline(bundle, str(work), stages=["inference"])


def _learning(bundle: str, tmp_path, **learning) -> checks.LearningResult:
    _edit_json(os.path.join(bundle, "configs/pipeline.json"), lambda p: p.update(learning=learning))
    result = run_pipeline(bundle, str(tmp_path / "work"), stages=["train"])
    return checks.check_learning(bundle, result)


@pytest.mark.slow
def test_a_training_that_does_not_lower_its_loss_fails_the_learning_check(bundle, tmp_path):
    frozen = {"epochs": 8, "val_interval": 1000, "learning_rate": 0.0}
    with pytest.raises(checks.BundleCheckError, match=r"broken_bundle: training did not lower its loss by 5% in 8"):
        _learning(bundle, tmp_path, stages={"train": frozen})


@pytest.mark.slow
def test_a_model_no_better_than_an_untrained_one_fails_the_learning_check(bundle, tmp_path):
    untrained = str(tmp_path / "work" / "train_via_run" / "untrained.pt")  # evaluated in place of the trained model
    with pytest.raises(checks.BundleCheckError, match=r"no better than an untrained one .*: mean_dice (\S+) vs \1$"):
        _learning(bundle, tmp_path, evaluate_overrides={"ckpt_path": untrained})


def test_the_learning_check_refuses_unknown_settings_and_an_opt_out_without_reason(bundle, tmp_path):
    not_run = PipelineResult("broken_bundle", "", "", str(tmp_path))  # refused before anything runs
    for learning, match in [({"epochs": 3}, r"'learning' has unknown keys \['epochs'\]"),
                            ({"stages": {"evaluate": {}}}, r"must name the train stage"),
                            ({"compare_untrained": False}, "compare_untrained false needs an untrained_reason")]:  # fmt: skip
        _edit_json(os.path.join(bundle, "configs/pipeline.json"), lambda p, new=learning: p.update(learning=new))
        with pytest.raises(checks.BundleCheckError, match=match):
            checks.check_learning(bundle, not_run)


def test_epoch_losses_average_the_iterations_of_each_epoch():
    log = (
        "2026 - INFO - Epoch: 1/2, Iter: 1/2 -- train_loss: 1.0000 \n"
        "2026 - INFO - Epoch: 1/2, Iter: 2/2 -- train_loss: 0.5000 \n"
        "2026 - INFO - Epoch: 2/2, Iter: 1/2 -- other_loss: 9.0 \n"
        "2026 - INFO - Epoch: 2/2, Iter: 1/2 -- train_loss: 0.2500 \n"
    )
    assert checks.epoch_losses(log) == [0.75, 0.25]
