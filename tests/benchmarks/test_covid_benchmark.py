"""Tests for common/benchmarks/covid.py: its pieces, and the whole benchmark at toy sizes (one phantom, one seed,
one epoch per stage: it runs every stage and is resumable); the real run is tools/benchmark_covid.py."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.benchmarks.covid import (
    _truth,
    add_true_labels,
    check_targets,
    run_covid_benchmark,
    write_label_dir,
)
from common.data.datalist import build_datalist, validate_datalist_no_leak
from common.data.pseudo_masks import load_slice_classes
from common.data.synthetic.write import write_mosmed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosmed")
    write_mosmed(str(root), shape=(48, 48, 16), seed=0, progress=False, category_counts={0: 2, 1: 4})
    datalist = build_datalist("mosmed", root, val_fraction=0.25, test_fraction=0.25, progress=False)
    return str(root), datalist


def test_true_labels_only_for_held_out_lesioned_studies(dataset):
    root, datalist = dataset
    labelled = add_true_labels(datalist, root)
    validate_datalist_no_leak(labelled, root)  # training untouched
    assert labelled["training"] == datalist["training"]
    for item in labelled["validation"] + labelled["testing"]:
        assert ("label" in item) == (item["category"] != "CT-0")
    assert json.dumps(datalist) != json.dumps(labelled)  # a copy was changed, not the input


def test_label_dir_is_laid_out_like_the_pseudo_mask_stage(dataset, tmp_path):
    root, datalist = dataset
    out = write_label_dir(datalist, root, str(tmp_path / "true"), (8, 16, 16), lambda it, *_: _truth(root, it["case"]))
    content = load_slice_classes(f"{out}/slice_classes.json", grid=(8, 16, 16))
    assert sorted(content["cases"]) == sorted(it["case"] for it in datalist["training"])
    for item in datalist["training"]:
        mask = nib.load(f"{out}/{item['case']}_pseudo.nii.gz")
        ref = nib.load(f"{root}/{item['image']}")
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
        if item["category"] == "CT-0":
            assert not np.asarray(mask.dataobj).any()
            assert all(b in (0.0, None) for b in content["cases"][item["case"]]["burden"])
        else:
            truth = np.asarray(nib.load(f"{root}/synthetic_truth/{item['case']}_mask.nii.gz").dataobj)
            np.testing.assert_array_equal(np.asarray(mask.dataobj), truth)
            assert max(b or 0.0 for b in content["cases"][item["case"]]["burden"]) > 0


def _summaries(gan: float, hu: float, true: float) -> dict:
    return {
        "transunet_gan_final": {"mean_dice": gan},
        "transunet_hu_final": {"mean_dice": hu},
        "transunet_true_final": {"mean_dice": true},
    }


def test_targets():
    assert check_targets(_summaries(0.6, 0.5, 0.65), "final") == {
        "gan_at_least_hu": True,
        "fraction_of_upper_bound": pytest.approx(0.6 / 0.65),
        "at_least_90_percent": True,
    }
    targets = check_targets(_summaries(0.5, 0.55, 0.7), "final")
    assert not targets["gan_at_least_hu"] and not targets["at_least_90_percent"]


TINY_UNET = {
    "network_def#img_size": 16,
    "network_def#stem_channels": 4,
    "network_def#encoder_channels": [8, 8, 16],
    "network_def#vit_layers": 1,
    "network_def#vit_heads": 2,
    "network_def#vit_mlp_dim": 8,
    "network_def#hidden_size": 8,
    "network_def#head_channels": 8,
    "network_def#decoder_channels": [8, 4, 4, 4],
    "network_def#proj_dim": 4,
    "batch_size": 8,
    "contrastive_batch_size": 8,
}
TINY_GAN = {
    "network_def#channels": [4, 8],
    "network_def#noise_channels": 2,
    "discriminator_def#channels": [4, 8],
    "batch_size": 2,
}


def test_whole_benchmark_at_toy_size_and_resumed(tmp_path):
    lines: list[str] = []
    kwargs = dict(
        phantoms=("realistic",), seeds=(3,), selections=("final",), num_cases=14, shape=(40, 40, 16),
        grid=(8, 16, 16), gan_epochs=1, unet_epochs=1, val_fraction=0.2, test_fraction=0.2,
        gan_overrides=TINY_GAN, unet_overrides=TINY_UNET, progress=lines.append,
    )  # fmt: skip
    report = run_covid_benchmark(str(tmp_path), **kwargs)
    block = report["phantoms"]["realistic"]
    assert set(block["methods"]) == {
        "transunet_gan_final", "transunet_hu_final", "transunet_true_final", "hu_rule", "hu_rule_tuned"
    }  # fmt: skip
    for name, summary in block["methods"].items():
        assert summary["num_runs"] == 1 and 0.0 <= summary["mean_dice"] <= 1.0, name
    assert block["num_test_studies"] >= 1 and -800 < block["hu_window"][0] < -200  # Otsu inside the lung
    assert (tmp_path / "realistic" / "seed3" / "transunet_gan_final" / "model.pt").is_file()
    assert set(block["targets"]) == {"final"}
    with open(tmp_path / "covid_benchmark.json") as f:
        assert json.load(f)["phantoms"]["realistic"]["targets"] == json.loads(json.dumps(block["targets"]))
    assert "Phantom `realistic`" in (tmp_path / "covid_benchmark.md").read_text()
    # a second invocation reuses every finished run (and gives the same figures)
    lines.clear()
    again = run_covid_benchmark(str(tmp_path), **kwargs)
    reused = [line for line in lines if line.startswith("reusing finished run")]
    assert len(reused) == 8 and not any("GAN seed" in line for line in lines)
    assert again["phantoms"]["realistic"]["methods"] == json.loads(json.dumps(block["methods"]))
