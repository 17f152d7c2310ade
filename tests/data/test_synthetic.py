"""Tests of common/data/synthetic: phantoms (brain, chest CT, MRI-PET) and the public-layout writers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import itk
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.data.synthetic.brain import (
    EDEMA,
    ENHANCING,
    NECROTIC_CORE,
    make_brain_case,
    radial_mass_effect,
    smooth_random_field,
)
from common.data.synthetic.chest_ct import LESION_BURDEN, make_chest_ct_case
from common.data.synthetic.mri_pet import make_mri_pet_case
from common.data.synthetic.write import (
    LAYOUTS,
    mosmed_category_counts,
    parse_shape,
    write_mosmed,
    write_synthetic_dataset,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "make_synthetic_data.py")
BRAIN_SHAPE = (24, 24, 20)
CUBE = np.ones((3, 3, 3), dtype=bool)


def _files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def _load(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[str, list[str]]]:
    """Every layout written once at tiny sizes: layout -> (folder, returned case ids)."""
    root = tmp_path_factory.mktemp("synthetic")
    settings = {
        "brats2021": (2, BRAIN_SHAPE),
        "brats2023": (1, BRAIN_SHAPE),
        "msd_task01": (2, BRAIN_SHAPE),
        "mosmed": (6, (32, 32, 16)),
        "adni_pairs": (3, (20, 20, 20)),
    }
    out = {}
    for layout, (num_cases, shape) in settings.items():
        folder = str(root / layout)
        ids = write_synthetic_dataset(layout, folder, num_cases=num_cases, shape=shape, seed=0, progress=False)
        out[layout] = (folder, ids)
    return out


def test_layout_file_names(datasets):
    folder, ids = datasets["brats2021"]
    assert ids == ["BraTS2021_00000", "BraTS2021_00001"]
    assert _files(folder) == {f"{c}/{c}_{m}.nii.gz" for c in ids for m in ("t1", "t1ce", "t2", "flair", "seg")}

    folder, ids = datasets["brats2023"]
    assert ids == ["BraTS-GLI-00000-000"]
    assert _files(folder) == {f"{c}/{c}-{m}.nii.gz" for c in ids for m in ("t1n", "t1c", "t2w", "t2f", "seg")}

    folder, ids = datasets["msd_task01"]
    assert ids == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert _files(folder) == {
        "dataset.json",
        "imagesTr/BRATS_001.nii.gz",
        "imagesTr/BRATS_002.nii.gz",
        "labelsTr/BRATS_001.nii.gz",
        "labelsTr/BRATS_002.nii.gz",
        "imagesTs/BRATS_003.nii.gz",
    }

    # 6 studies: CT-0 gets 6 // 3 = 2, CT-1 the other 4, masks for half of CT-1, truth for every lesioned study
    folder, ids = datasets["mosmed"]
    assert mosmed_category_counts(6) == {0: 2, 1: 4, 2: 0, 3: 0, 4: 0}
    assert ids == [f"study_{i:04d}" for i in range(1, 7)]
    assert _files(folder) == {
        "studies/CT-0/study_0001.nii.gz",
        "studies/CT-0/study_0002.nii.gz",
        *(f"studies/CT-1/study_{i:04d}.nii.gz" for i in range(3, 7)),
        "masks/study_0003_mask.nii.gz",
        "masks/study_0004_mask.nii.gz",
        *(f"synthetic_truth/study_{i:04d}_mask.nii.gz" for i in range(3, 7)),
    }

    folder, ids = datasets["adni_pairs"]
    truth = json.load(open(os.path.join(folder, "synthetic_truth.json")))
    assert [s["subject"] for s in truth["subjects"]] == ids
    expected = {"synthetic_truth.json"}
    for item in truth["subjects"]:
        assert re.fullmatch(r"\d{3}_S_\d{4}", item["subject"]) and re.fullmatch(r"I\d{5,6}", item["image_id"])
        expected |= {f"{item['subject']}/{item['image_id']}_{kind}_MNI152.nii.gz" for kind in ("mri", "FDG")}
    assert _files(folder) == expected
    assert len(set(ids)) == 3


def test_every_file_reads_with_nibabel_and_itk(datasets):
    checked = 0
    for layout, (folder, _) in datasets.items():
        for name in sorted(_files(folder)):
            if not name.endswith(".nii.gz"):
                continue
            path = os.path.join(folder, name)
            image = nib.load(path)
            header = image.header
            assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1, path
            assert np.allclose(image.get_sform(), image.get_qform(), atol=1e-4), path
            is_label = "seg" in name or "labelsTr" in name or "mask" in name
            expected = np.uint8 if is_label else (np.int16 if layout == "mosmed" else np.float32)
            assert image.get_data_dtype() == expected, path
            read = itk.imread(path)
            assert tuple(itk.array_view_from_image(read).shape[::-1]) == image.shape, path
            assert np.allclose(tuple(read.GetSpacing())[:3], header.get_zooms()[:3], rtol=1e-5), path
            checked += 1
    assert checked == 10 + 5 + 5 + 12 + 6


def test_label_values_per_layout(datasets):
    folder, ids = datasets["brats2021"]
    for case_id in ids:
        assert set(np.unique(_load(f"{folder}/{case_id}/{case_id}_seg.nii.gz"))) == {0, 1, 2, 4}
    folder23, (case23,) = datasets["brats2023"]
    seg23 = _load(f"{folder23}/{case23}/{case23}-seg.nii.gz")
    assert set(np.unique(seg23)) == {0, 1, 2, 3}
    folder_msd, _ = datasets["msd_task01"]
    assert set(np.unique(_load(f"{folder_msd}/labelsTr/BRATS_001.nii.gz"))) == {0, 1, 2, 3}

    # one seed gives the same phantom in every brain layout: check the relabelling and the MSD channel order
    c21 = ids[0]
    seg21 = _load(f"{folder}/{c21}/{c21}_seg.nii.gz")
    assert np.array_equal(seg23, np.where(seg21 == 4, 3, seg21))
    msd_seg = _load(f"{folder_msd}/labelsTr/BRATS_001.nii.gz")
    assert np.array_equal(msd_seg, np.select([seg21 == 2, seg21 == 1, seg21 == 4], [1, 2, 3], 0))
    msd_image = _load(f"{folder_msd}/imagesTr/BRATS_001.nii.gz")
    assert msd_image.shape == (*BRAIN_SHAPE, 4)
    for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        assert np.array_equal(msd_image[..., channel], _load(f"{folder}/{c21}/{c21}_{modality}.nii.gz"))
    for old, new in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")):
        assert np.array_equal(
            _load(f"{folder23}/{case23}/{case23}-{new}.nii.gz"), _load(f"{folder}/{c21}/{c21}_{old}.nii.gz")
        )


def test_brats_affine_convention(datasets):
    folder, (case_id, _) = datasets["brats2021"]
    affine = nib.load(f"{folder}/{case_id}/{case_id}_t1.nii.gz").affine
    spacing = 240 / 24  # the 240 x 240 x 155 mm field of view kept on a 24 x 24 x 20 grid
    expected = np.diag([-spacing, -spacing, spacing, 1.0])
    expected[1, 3] = 23 * spacing
    assert np.allclose(affine, expected)


def test_msd_dataset_json(datasets):
    folder, _ = datasets["msd_task01"]
    dataset = json.load(open(os.path.join(folder, "dataset.json")))
    assert dataset["name"] == "BRATS"
    assert dataset["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert dataset["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert dataset["numTraining"] == 2 and dataset["numTest"] == 1
    assert dataset["training"][1] == {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"}
    assert dataset["test"] == ["./imagesTs/BRATS_003.nii.gz"]
    for entry in dataset["training"]:
        assert os.path.isfile(os.path.join(folder, entry["image"])) and os.path.isfile(
            os.path.join(folder, entry["label"])
        )


def test_mosmed_masks_only_for_a_subset_of_ct1(datasets):
    folder, _ = datasets["mosmed"]
    for number in (3, 4):  # the released masks are the true lesions of those CT-1 studies
        mask = _load(f"{folder}/masks/study_{number:04d}_mask.nii.gz")
        assert mask.any() and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask, _load(f"{folder}/synthetic_truth/study_{number:04d}_mask.nii.gz"))
    for number in (1, 2):  # healthy studies: air outside, lungs, soft tissue, no truth mask
        image = _load(f"{folder}/studies/CT-0/study_{number:04d}.nii.gz")
        assert image.min() < -900 and image.max() > 0
        assert not os.path.exists(f"{folder}/synthetic_truth/study_{number:04d}_mask.nii.gz")


def test_mosmed_category_numbering_and_mask_fraction(tmp_path):
    ids = write_mosmed(str(tmp_path), shape=(20, 20, 16), category_counts={0: 1, 2: 1, 1: 2, 4: 1}, progress=False)
    assert ids == [f"study_{i:04d}" for i in range(1, 6)]
    files = _files(str(tmp_path))
    assert {f for f in files if f.startswith("studies/")} == {
        "studies/CT-0/study_0001.nii.gz",
        "studies/CT-1/study_0002.nii.gz",
        "studies/CT-1/study_0003.nii.gz",
        "studies/CT-2/study_0004.nii.gz",
        "studies/CT-4/study_0005.nii.gz",
    }
    assert {f for f in files if f.startswith("masks/")} == {"masks/study_0002_mask.nii.gz"}
    assert len([f for f in files if f.startswith("synthetic_truth/")]) == 4
    with pytest.raises(ValueError, match="category_counts"):
        write_mosmed(str(tmp_path), shape=(20, 20, 16), category_counts={5: 1}, progress=False)


def test_adni_truth_and_identifiers(datasets, tmp_path):
    folder, ids = datasets["adni_pairs"]
    truth = json.load(open(os.path.join(folder, "synthetic_truth.json")))
    flagged = [s for s in truth["subjects"] if s["hypometabolism"]]
    assert len(flagged) == 1  # every third subject
    assert truth["hypometabolic_subjects"] == [flagged[0]["subject"]] and flagged[0]["region"]
    other = write_synthetic_dataset(
        "adni_pairs", str(tmp_path), num_cases=1, shape=(16, 16, 16), seed=1, progress=False
    )
    assert other[0] not in ids
    again = write_synthetic_dataset(
        "adni_pairs", str(tmp_path / "b"), num_cases=1, shape=(16, 16, 16), seed=0, progress=False
    )
    assert again == ids[:1]


def test_written_files_are_deterministic(tmp_path):
    def write(name: str, seed: int) -> np.ndarray:
        folder = str(tmp_path / name)
        write_synthetic_dataset("brats2021", folder, num_cases=1, shape=(16, 16, 16), seed=seed, progress=False)
        return np.stack([_load(f"{folder}/BraTS2021_00000/BraTS2021_00000_{m}.nii.gz") for m in ("t1", "flair")])

    first, second, other = write("a", 7), write("b", 7), write("c", 8)
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


@pytest.mark.parametrize(
    "maker, shape",
    [(make_brain_case, (20, 20, 16)), (make_chest_ct_case, (24, 24, 16)), (make_mri_pet_case, (16, 16, 16))],
)
def test_generators_are_deterministic(maker, shape):
    first, second, other = maker(shape, np.random.default_rng(5)), maker(shape, 5), maker(shape, 6)
    arrays = [k for k, v in first.items() if isinstance(v, np.ndarray) and v.ndim == 3]
    assert len(arrays) >= 3
    for key in arrays:
        assert first[key].tobytes() == second[key].tobytes(), key
    assert any(first[k].tobytes() != other[k].tobytes() for k in arrays)


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 24, 20), (32, 28, 24)])
def test_tumour_classes_present_and_nested(shape):
    for seed in range(3):
        case = make_brain_case(shape, seed)
        seg = case["seg"]
        assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, NECROTIC_CORE, EDEMA, ENHANCING}
        necrosis = seg == NECROTIC_CORE
        # the enhancing rim encloses the core: every neighbour of a necrotic voxel is necrotic or enhancing
        assert np.isin(seg[ndimage.binary_dilation(necrosis, CUBE)], [NECROTIC_CORE, ENHANCING]).all()
        # edema borders the tumour core, and the whole tumour is in the brain
        core = necrosis | (seg == ENHANCING)
        assert (seg[ndimage.binary_dilation(core, CUBE) & ~core] == EDEMA).any()
        assert case["brain_mask"][seg > 0].all()


def test_brain_modality_contrasts():
    case = make_brain_case((48, 48, 40), 0)
    healthy = (case["seg"] == 0) & (case["brain_mask"] > 0)

    def mean(modality: str, region: np.ndarray) -> float:
        assert region.sum() > 20
        return float(case[modality][region].mean())

    gm, wm, csf = (healthy & (case[t] > 0.5) for t in ("gm", "wm", "csf"))
    assert mean("t1", wm) > 1.2 * mean("t1", gm) > 1.2 * mean("t1", csf)  # T1: WM bright, CSF dark
    assert mean("t2", csf) > 1.5 * mean("t2", wm) and mean("t2", gm) > mean("t2", wm)  # T2: CSF bright
    assert mean("flair", csf) < 0.8 * mean("flair", wm)  # FLAIR: CSF suppressed
    enhancing, necrosis, edema = (case["seg"] == v for v in (ENHANCING, NECROTIC_CORE, EDEMA))
    assert mean("t1ce", enhancing) > 1.1 * mean("t1ce", wm)  # T1c: enhancing rim
    # relative to white matter (each modality has its own scanner scale), contrast lights up the rim
    assert mean("t1ce", enhancing) / mean("t1ce", wm) > 1.5 * mean("t1", enhancing) / mean("t1", wm)
    assert mean("t1ce", necrosis) < 0.7 * mean("t1ce", enhancing)
    assert mean("flair", edema) > 1.2 * mean("flair", wm)
    for modality in ("t1", "t1ce", "t2", "flair"):
        image = case[modality]
        assert image.dtype == np.float32 and image.min() >= 0
        assert not image[case["brain_mask"] == 0].any() and (image[case["brain_mask"] > 0] > 0).mean() > 0.99


def test_mass_effect_pushes_tissue_outward():
    volume = np.zeros((41, 41, 41), dtype=np.float32)
    volume[28, 20, 20] = 1.0  # 8 voxels from the centre, in +x
    (moved,) = radial_mass_effect([volume], (20.0, 20.0, 20.0), sigma=8.0, amplitude=0.5)
    centroid = ndimage.center_of_mass(moved)
    assert centroid[0] > 30.0 and abs(centroid[1] - 20) < 1e-3 and abs(centroid[2] - 20) < 1e-3
    far = np.zeros_like(volume)
    far[2, 2, 2] = 1.0  # > 3 sigma away: untouched
    assert np.array_equal(radial_mass_effect([far], (30.0, 30.0, 30.0), 3.0, 0.5)[0], far)
    with pytest.raises(ValueError, match="amplitude"):
        radial_mass_effect([volume], (20.0, 20.0, 20.0), 8.0, 1.0)


def test_smooth_random_field_statistics():
    field = smooth_random_field((40, 40, 40), np.random.default_rng(0), 6.0)
    assert field.dtype == np.float32 and field.shape == (40, 40, 40)
    assert abs(field.mean()) < 0.05 and abs(field.std() - 1) < 0.05
    neighbour = np.corrcoef(field[:-1].ravel(), field[1:].ravel())[0, 1]
    assert neighbour > 0.9  # smooth on the requested scale
    rough = smooth_random_field((40, 40, 40), np.random.default_rng(0), 1.0)
    assert np.corrcoef(rough[:-1].ravel(), rough[1:].ravel())[0, 1] < neighbour


def test_chest_ct_lungs_lesions_and_categories():
    shape = (48, 48, 20)
    cases = [make_chest_ct_case(shape, 3, category) for category in range(5)]
    healthy = cases[0]
    image, lung = healthy["image"], healthy["lung"] > 0
    assert image.dtype == np.int16 and lung.sum() > 500
    spacing = healthy["spacing"]
    assert spacing[2] > spacing[0] and 0.7 * 512 / 48 <= spacing[0] <= 0.8 * 512 / 48
    body = (image > -500) & ~lung
    assert image[lung].mean() < -700 and image[lung].mean() < image[body].mean() - 600
    assert np.abs(image[0].astype(float) + 1000).mean() < 60  # air outside the body
    assert not healthy["lesion"].any() and float(healthy["lesion_fraction"]) == 0

    fractions = [float(c["lesion_fraction"]) for c in cases]
    assert all(a < b for a, b in zip(fractions, fractions[1:]))  # burden grows with CT-1 < ... < CT-4
    pleural_distance = ndimage.distance_transform_edt(lung, sampling=spacing)
    for category, case in enumerate(cases[1:], start=1):
        lesion = case["lesion"] > 0
        assert case["lesion"].dtype == np.uint8 and lesion.any() and not (lesion & ~lung).any()
        low, high = LESION_BURDEN[category]
        assert low - 0.05 <= fractions[category] <= high + 0.01
        assert -750 < case["image"][lesion].mean() < 0  # ground glass and consolidation
        # same seed, same anatomy and noise: the lesion is the only change
        far = ~ndimage.binary_dilation(lesion, CUBE, iterations=3)
        assert np.array_equal(case["image"][far], image[far])
    lesion = cases[1]["lesion"] > 0
    assert pleural_distance[lesion].mean() < pleural_distance[lung].mean()  # subpleural preference


def test_mri_pet_contrast_and_hypometabolism():
    normal = make_mri_pet_case((64, 64, 64), np.random.default_rng(0), hypometabolism=False)
    reduced = make_mri_pet_case((64, 64, 64), np.random.default_rng(0), hypometabolism=True)
    pet, brain = normal["pet"], normal["brain_mask"] > 0
    assert pet.dtype == np.float32 and normal["mri"].dtype == np.float32
    assert pet.min() >= 0 and normal["mri"].min() >= 0 and not normal["mri"][~brain].any()
    gm = pet[brain & (normal["gm"] > 0.8)].mean()
    wm = pet[brain & (normal["wm"] > 0.95)].mean()
    ventricles = ndimage.binary_erosion(normal["csf"] > 0.5) & (normal["csf"] > 0.8)
    assert gm > 2 * wm and wm > 1.1 * pet[ventricles].mean()  # GM > 2 x WM > CSF

    assert not normal["hypometabolism"].any() and str(normal["region"]) == ""
    assert np.array_equal(normal["mri"], reduced["mri"])  # same subject, only the PET changes
    blob = reduced["hypometabolism"] > 0.1
    assert blob.sum() > 10 and str(reduced["region"])
    assert reduced["pet"][blob].mean() < 0.92 * pet[blob].mean()
    untouched = ndimage.gaussian_filter(reduced["hypometabolism"], 3) < 1e-5
    assert np.allclose(reduced["pet"][untouched], pet[untouched], rtol=1e-3, atol=1e-3)


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match=r"layout must be one of brats2021, brats2023, msd_task01, mosmed, adni_pairs"):
        write_synthetic_dataset("brats2019", str(tmp_path))
    for shape in [(8, 8, 8), (16, 16), "a,b,c", (16.5, 16, 16)]:
        with pytest.raises(ValueError, match="shape"):
            write_synthetic_dataset("brats2021", str(tmp_path), shape=shape)
    with pytest.raises(ValueError, match="num_cases"):
        write_synthetic_dataset("mosmed", str(tmp_path), num_cases=0)
    with pytest.raises(ValueError, match="seed"):
        write_synthetic_dataset("mosmed", str(tmp_path), seed=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="output_dir"):
        write_synthetic_dataset("mosmed", str(tmp_path / "file"))
    with pytest.raises(ValueError, match="category"):
        make_chest_ct_case((16, 16, 16), 0, category=5)
    assert parse_shape("64,64,48") == parse_shape((64, 64, 48)) == parse_shape("64x64x48") == (64, 64, 48)
    assert parse_shape(None) is None
    assert set(LAYOUTS) == {"brats2021", "brats2023", "msd_task01", "mosmed", "adni_pairs"}
    assert not any(tmp_path.iterdir()) or {p.name for p in tmp_path.iterdir()} == {"file"}


def test_command_line(tmp_path):
    output = tmp_path / "mosmed"
    command = [sys.executable, TOOL, "--layout", "mosmed", "--output_dir", str(output), "--num_cases", "3"]
    done = subprocess.run(
        [*command, "--shape", "20,20,16", "--seed", "1", "--progress", "false"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 mosmed cases" in done.stdout
    assert _files(str(output)) >= {
        "studies/CT-0/study_0001.nii.gz",
        "studies/CT-1/study_0002.nii.gz",
        "masks/study_0002_mask.nii.gz",
    }

    bad = subprocess.run(
        [sys.executable, TOOL, "--layout", "nope", "--output_dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "layout must be one of" in lines[0] and "brats2021" in lines[0]
    assert not (tmp_path / "x").exists()
