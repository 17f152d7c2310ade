"""The MedSegDiff speed measurements (common/benchmarks/medsegdiff_speed.py) on a small crop of the MNI152 T1."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from nilearn import datasets

from common.benchmarks.medsegdiff_speed import (
    format_speed,
    mni_case,
    profile_inference,
    whole_volume_vs_slice_by_slice,
)

TINY = {
    "fusion": "mean",  # STAPLE would load ITK (seconds); the speed command profiles the bundle's STAPLE
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, True],
    "network_def#num_heads": 2,
    "network_def#norm_num_groups": 4,
    "network_def#ff_parser_size": [16, 16],
    "roi_size": [16, 16],
}
SHAPE = (48, 56, 40)


def test_mni_case_is_a_real_t1_cropped_about_its_centre(tmp_path):
    dataset_dir, datalist = mni_case(str(tmp_path), SHAPE)
    first = nib.load(str(tmp_path / "MNI152_T1" / "MNI152_T1_t1ce.nii.gz"))
    assert first.shape == SHAPE
    data = np.asarray(first.dataobj)
    template = datasets.load_mni152_template(resolution=1)
    start = [(n - m) // 2 for n, m in zip(template.shape, SHAPE)]
    crop = np.asarray(template.dataobj)[tuple(slice(a, a + m) for a, m in zip(start, SHAPE))]
    np.testing.assert_array_equal(data, crop)
    np.testing.assert_allclose(first.affine[:3, 3], template.affine[:3, :3] @ start + template.affine[:3, 3])
    for modality in ("t1", "t2", "flair"):
        other = nib.load(str(tmp_path / "MNI152_T1" / f"MNI152_T1_{modality}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(other.dataobj), data)  # the same T1 in all four channels
        np.testing.assert_allclose(other.affine, first.affine)


def test_profile_breaks_the_run_down_and_skips_missing_switches(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = profile_inference(
            str(tmp_path),
            variants={
                "previous default (32 pairs per call)": {**TINY, "sample_batch_size": 32},
                "default": {**TINY, "sample_batch_size": 2},
                "not a switch": {"no_such_switch": True},
            },
            threads=1,
            shape=SHAPE,
        )
    finally:
        torch.set_num_threads(threads)
    rows = result["variants"]
    assert set(rows) == {"previous default (32 pairs per call)", "default"}
    old, new = rows["previous default (32 pairs per call)"], rows["default"]
    assert new["pairs"] == old["pairs"] > 0 and new["pairs"] % 2 == 0  # every (slice, sample) pair once, 1 step
    assert new["network_calls"] == new["pairs"] // 2 and old["network_calls"] == -(-old["pairs"] // 32)
    assert {"network passes", "ensemble fusion", "load + preprocess", "writing"} <= set(new["stages"])
    assert new["stages"]["network passes"] > 0
    assert new["voxels_differing_from_default"] == 0 and old["voxels_differing_from_default"] == 0
    assert new["wall_seconds"] > sum(new["stages"].values()) > 0
    table = format_speed({"profile": result, "batching": {}})
    assert "| default |" in table and "network passes (s)" in table


def test_whole_volume_chain_gives_the_slice_by_slice_masks(tmp_path):
    row = whole_volume_vs_slice_by_slice(
        str(tmp_path),
        network_overrides=TINY,
        slices=4,
        num_inference_steps=2,
        num_ensemble=3,
        batch_size=5,
        shape=SHAPE,
    )
    assert row["masks_identical"] and row["slices"] == 4 and row["batch_size"] == 5
    assert row["whole_volume_seconds"] > 0 and row["slice_by_slice_seconds"] > 0
