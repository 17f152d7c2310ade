"""Tests of the realistic brain tumour phantom (common/data/synthetic/brain.py, ``phantom="realistic"``): sizes,
multifocality, rims, fading edema, per-case scanners, BraTS nesting, and the three brain layouts it is written in."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from common.data.labels import labels_to_regions
from common.data.synthetic.brain import (
    BRAIN_PHANTOMS,
    BRATS_MODALITIES,
    EDEMA,
    ENHANCING,
    NECROTIC_CORE,
    REALISTIC_TUMOUR_ML,
    make_brain_case,
    make_realistic_brain_case,
)
from common.data.synthetic.write import write_synthetic_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the benchmark's grid: 2.5 mm voxels, one mL is 64 voxels
SHAPE = (96, 96, 64)
FACES = ndimage.generate_binary_structure(3, 1)
NUM_CASES = 20


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    """The cases a 20-case dataset of seed 0 holds (the writers' ``default_rng([seed, index])``)."""
    return [make_brain_case(SHAPE, np.random.default_rng([0, k]), phantom="realistic") for k in range(NUM_CASES)]


def _ml(case: dict, mask: np.ndarray) -> float:
    return float(mask.sum() * np.prod(case["spacing"]) / 1000.0)


def test_tumour_volumes_span_1_to_100_ml_and_some_cases_are_multifocal(cases):
    volumes = np.array([_ml(c, c["seg"] > 0) for c in cases])
    planned = np.array([c["planned_tumour_ml"] for c in cases])
    low, high = REALISTIC_TUMOUR_ML
    assert ((planned >= low) & (planned <= high)).all()
    # the level sets meet the drawn volume; only the per-lesion floor (27 voxels = 0.42 mL here) adds to tiny ones
    assert np.all(np.abs(volumes - planned) <= 0.1 * planned + 0.7), np.c_[planned, volumes]
    assert volumes.min() < 2.0 and volumes.max() > 60.0  # the range is covered, log-uniformly:
    assert ((volumes >= 1) & (volumes < 10)).sum() >= 4 and ((volumes >= 10) & (volumes <= 110)).sum() >= 4
    lesions = [c["num_lesions"] for c in cases]
    components = [ndimage.label(c["seg"] > 0, np.ones((3, 3, 3)))[1] for c in cases]
    assert set(lesions) == {1, 2, 3}
    # one connected tumour per lesion at most: no stray edema islands; multifocal cases show separate lesions
    assert all(1 <= n <= k for n, k in zip(components, lesions))
    assert sum(n >= 2 for n in components) >= 2


def test_labels_follow_brats_nesting_and_edema_surrounds_the_core(cases):
    for case in cases:
        seg = case["seg"]
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, NECROTIC_CORE, EDEMA, ENHANCING}
        assert (seg == ENHANCING).any() and (seg == EDEMA).any()
        regions = labels_to_regions(seg[None], "brats2021")  # TC, WT, ET
        tc, wt, et = (regions[i].astype(bool) for i in range(3))
        assert tc.any() and not (et & ~tc).any() and not (tc & ~wt).any()
        # every face-neighbour of the tumour core is core or edema (or outside the brain); all tumour is brain
        brain = case["brain_mask"] > 0
        assert np.isin(seg[ndimage.binary_dilation(tc, FACES) & ~tc & brain], [EDEMA]).all()
        assert brain[wt].all()


def test_enhancing_rims_are_irregular_thin_or_incomplete(cases):
    enclosed, et_share = [], []
    for case in cases:
        core = np.isin(case["seg"], (NECROTIC_CORE, ENHANCING))
        surface = core & ~ndimage.binary_erosion(core, FACES)
        enclosed.append(((case["seg"] == ENHANCING) & surface).sum() / surface.sum())
        et_share.append((case["seg"] == ENHANCING).sum() / core.sum())
    enclosed, et_share = np.array(enclosed), np.array(et_share)
    # some cores are (almost) closed by the rim, others have most of their surface without enhancement
    assert enclosed.max() > 0.95 and enclosed.min() < 0.5 and (enclosed < 0.8).sum() >= 5
    # solid enhancing nodules and thin rims around large necrotic or non-enhancing cores
    assert et_share.max() > 0.8 and et_share.min() < 0.35


def test_edema_signal_fades_from_the_core_across_the_label_border(cases):
    flair_follows = []
    for case in cases:
        seg, signal = case["seg"], case["edema_signal"]
        core = np.isin(seg, (NECROTIC_CORE, ENHANCING))
        healthy = (seg == 0) & (case["brain_mask"] > 0)
        from_core = ndimage.distance_transform_edt(~core)
        outside = ndimage.distance_transform_edt(seg == 0)
        edema = seg == EDEMA
        border = edema & ndimage.binary_dilation(healthy, FACES) & (from_core > 2)
        assert signal.min() >= 0 and signal.max() <= 1
        if border.sum() < 20:  # a small lesion whose edema is only a voxel or two thick
            continue
        # strongest at the core (the voxels touching it share their signal with the core), faint but not nothing
        # at the labelled border, and on beyond it, fading out
        shell = edema & (from_core > 1.5)
        assert stats.spearmanr(from_core[shell], signal[shell]).statistic < -0.6
        assert 0.1 < signal[border].mean() < 0.5
        just_outside = healthy & (outside <= 1)
        assert signal[border].mean() > signal[just_outside].mean() > 0.1
        assert signal[healthy & (outside >= 8)].max() < 0.1
        # the image follows: within the edema, FLAIR is brighter where the edema signal is stronger
        flair_follows.append(stats.spearmanr(signal[edema], case["flair"][edema]).statistic)
    assert len(flair_follows) >= 5 and min(flair_follows) > 0 and np.mean(flair_follows) > 0.3


def test_each_case_is_a_different_scanner(cases):
    def statistics(case: dict) -> dict[str, float]:
        healthy = (case["seg"] == 0) & (case["brain_mask"] > 0)
        wm = ndimage.binary_erosion(healthy & (case["wm"] > 0.9))
        gm = healthy & (case["gm"] > 0.7)
        t1 = case["t1"]
        residual = t1 - ndimage.gaussian_filter(t1, 1.0)
        return {
            "t1_median": float(np.median(t1[case["brain_mask"] > 0])),
            "flair_median": float(np.median(case["flair"][case["brain_mask"] > 0])),
            "t1_wm_over_gm": float(np.median(t1[wm]) / np.median(t1[gm])),
            "t1_noise": float(residual[wm].std() / np.median(t1[wm])),
        }

    measured = [statistics(c) for c in cases]
    column = {k: np.array([m[k] for m in measured]) for k in measured[0]}
    assert column["t1_median"].max() > 8 * column["t1_median"].min()  # gain
    assert column["t1_wm_over_gm"].max() > column["t1_wm_over_gm"].min() + 0.4  # contrast
    assert column["t1_noise"].max() > 2.5 * column["t1_noise"].min()  # noise level
    # the images follow each case's scanner, and the modalities of a case have their own gains
    gains = np.array([c["scanner"]["t1"]["gain"] for c in cases])
    noise = np.array([c["scanner"]["t1"]["noise"] for c in cases])
    assert stats.spearmanr(gains, column["t1_median"]).statistic > 0.9
    assert stats.spearmanr(noise, column["t1_noise"]).statistic > 0.8
    assert stats.spearmanr(column["t1_median"], column["flair_median"]).statistic < 0.6
    for case in cases:
        assert set(case["scanner"]) == set(BRATS_MODALITIES)
        assert len({round(p["gain"]) for p in case["scanner"].values()}) == 4
    # bias fields of different strength: the spread of white-matter intensity over the brain differs
    spread = []
    for case in cases:
        healthy = (case["seg"] == 0) & (case["wm"] > 0.95) & (case["brain_mask"] > 0)
        smooth = ndimage.gaussian_filter(case["t2"], 3.0)[healthy]
        spread.append(np.std(np.log(smooth)))
    assert max(spread) > 2 * min(spread)


def test_the_phantom_is_deterministic_and_the_default_stays_basic():
    first = make_realistic_brain_case((32, 32, 24), 3)
    again = make_brain_case((32, 32, 24), np.random.default_rng(3), phantom="realistic")
    basic = make_brain_case((32, 32, 24), 3)
    for key in ("t1", "t1ce", "t2", "flair", "seg"):
        assert first[key].tobytes() == again[key].tobytes()
    assert "scanner" not in basic and not np.array_equal(first["seg"], basic["seg"])
    assert BRAIN_PHANTOMS == ("basic", "realistic")
    with pytest.raises(ValueError, match="phantom must be one of basic, realistic"):
        make_brain_case((32, 32, 24), 3, phantom="hard")


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 24, 20)])
def test_tiny_grids_still_hold_a_nested_tumour(shape):
    for seed in range(3):
        seg = make_realistic_brain_case(shape, seed)["seg"]
        assert {EDEMA, ENHANCING} <= set(np.unique(seg)) <= {0, NECROTIC_CORE, EDEMA, ENHANCING}


def _regions(path: str, convention: str) -> np.ndarray:
    return labels_to_regions(torch.as_tensor(np.asarray(nib.load(path).dataobj))[None], convention).numpy()


def test_written_in_brats2021_brats2023_and_msd_layouts(tmp_path):
    shape = (48, 48, 32)
    folders = {}
    for layout in ("brats2021", "brats2023", "msd_task01"):
        folders[layout] = str(tmp_path / layout)
        write_synthetic_dataset(layout, folders[layout], num_cases=2, shape=shape, seed=4, phantom="realistic")
    for index in range(2):
        case = make_brain_case(shape, np.random.default_rng([4, index]), phantom="realistic")
        c21, c23, msd = f"BraTS2021_{index:05d}", f"BraTS-GLI-{index:05d}-000", f"BRATS_{index + 1:03d}"
        assert np.array_equal(np.asarray(nib.load(f"{folders['brats2021']}/{c21}/{c21}_seg.nii.gz").dataobj), case["seg"])
        regions = {
            "brats2021": _regions(f"{folders['brats2021']}/{c21}/{c21}_seg.nii.gz", "brats2021"),
            "brats2023": _regions(f"{folders['brats2023']}/{c23}/{c23}-seg.nii.gz", "brats2023"),
            "msd_task01": _regions(f"{folders['msd_task01']}/labelsTr/{msd}.nii.gz", "msd_task01"),
        }
        tc, wt, et = regions["brats2021"].astype(bool)
        assert et.any() and not (et & ~tc).any() and not (tc & ~wt).any()  # ET inside TC inside WT
        assert np.array_equal(regions["brats2023"], regions["brats2021"])
        assert np.array_equal(regions["msd_task01"], regions["brats2021"])
        image = np.asarray(nib.load(f"{folders['msd_task01']}/imagesTr/{msd}.nii.gz").dataobj)
        assert np.array_equal(image[..., 2], case["t1ce"]) and np.array_equal(image[..., 0], case["flair"])
    with pytest.raises(TypeError, match="phantom"):
        write_synthetic_dataset("mosmed", str(tmp_path / "m"), num_cases=1, shape=(20, 20, 16), phantom="realistic")


def test_command_line_phantom_option(tmp_path):
    tool = os.path.join(REPO_ROOT, "tools", "make_synthetic_data.py")
    base = [sys.executable, tool, "--num_cases", "1", "--shape", "24,24,20", "--progress", "false"]
    done = subprocess.run(
        [*base, "--layout", "brats2021", "--output_dir", str(tmp_path / "b"), "--phantom", "realistic"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    seg = np.asarray(nib.load(str(tmp_path / "b/BraTS2021_00000/BraTS2021_00000_seg.nii.gz")).dataobj)
    assert np.array_equal(seg, make_realistic_brain_case((24, 24, 20), np.random.default_rng([0, 0]))["seg"])
    for layout, phantom, message in (("mosmed", "realistic", "brain layouts only"), ("brats2021", "hard", "basic")):
        bad = subprocess.run(
            [*base, "--layout", layout, "--output_dir", str(tmp_path / layout), "--phantom", phantom],
            capture_output=True,
            text=True,
        )
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and message in lines[0], bad.stderr
        assert not (tmp_path / layout).exists()
