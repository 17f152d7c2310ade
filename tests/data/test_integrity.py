"""Tests for common/data/integrity.py: every planted defect is found and named, nothing else is reported."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import build_datalist, save_datalist
from common.data.decathlon import load_datalist
from common.data.integrity import (
    DATASET,
    Problem,
    check_item,
    dataset_report,
    require_valid_datalist,
    screen_items,
    verify_datalist,
    verify_dataset,
)
from common.data.synthetic.defects import (
    BENIGN_DEFECTS,
    FATAL_DEFECTS,
    applicable_defects,
    eligible_cases,
    plant_defect,
)
from common.data.synthetic.write import LAYOUTS, write_synthetic_dataset
from common.errors import DataError

SHAPE = (16, 16, 16)
LABELLED = ("brats2021", "brats2023", "msd_task01", "mosmed")
# what the report must say for each defect
WORDING = {
    "truncated": r"truncated or corrupt image data",
    "not_nifti": r"not a NIfTI file",
    "missing_modality": r"missing \S+\.nii\.gz",
    "three_channels": r"expected a 3D image, got 4D shape \(16, 16, 16, 3\)|"
    r"expected a 4D image with 4 channels, got 4D shape \(16, 16, 16, 3\)",
    "nan": r"contains 5 NaN values",
    "affine_mismatch": r"affine differs from that of",
    "bad_label_values": r"unexpected label values \[\d\]",
    "all_zero": r"all zero",
}


def write(layout: str, folder: Path, num_cases: int) -> list[str]:
    return write_synthetic_dataset(layout, str(folder), num_cases, SHAPE, seed=0, progress=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """layout -> (folder, planted [(case, defect, path)], report): every fatal defect in its own case, and, for
    labelled layouts, one more case with two problems (NaN in an image and a bad label value)."""
    out = {}
    for layout in LAYOUTS:
        folder = tmp_path_factory.mktemp(layout)
        defects = [d for d in FATAL_DEFECTS if d in applicable_defects(layout)]
        write(layout, folder, 20 if layout == "mosmed" else len(defects) + 2)
        used: set[str] = set()
        plan = [(d,) for d in defects] + ([("nan", "bad_label_values")] if layout in LABELLED else [])
        records = []
        for group in plan:
            case = next(c for c in eligible_cases(layout, str(folder), group[-1]) if c not in used)
            used.add(case)
            for defect in group:
                (path,) = plant_defect(layout, str(folder), case, defect, seed=len(used))
                records.append((case, defect, path))
        out[layout] = (folder, records, dataset_report(layout, str(folder), progress=False))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_planted_defect_is_found_and_named_in_one_pass(planted, layout):
    folder, records, report = planted[layout]
    problems = list(report.problems)
    assert len(records) >= len(applicable_defects(layout)) - len(BENIGN_DEFECTS)
    for case, defect, path in records:
        hits = [p for p in problems if p.path == path and re.search(WORDING[defect], p.problem)]
        assert len(hits) == 1, (defect, path, [str(p) for p in problems])
        assert hits[0].case.split("/")[0] == case  # ADNI: "<subject>/<image_id>"
        assert str(hits[0]) == f"{hits[0].case}: {path}: {hits[0].problem}"
        problems.remove(hits[0])
    assert problems == []  # nothing reported that was not planted
    if layout in LABELLED:  # the case with two problems has both
        double = records[-1][0]
        assert [d for c, d, _ in records if c == double] == ["nan", "bad_label_values"]
    assert report.num_cases >= len({c for c, _, _ in records}) + 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clean_and_benign_cases_have_no_problem(tmp_path, caplog, layout):
    cases = write(layout, tmp_path, 4)
    assert verify_dataset(layout, str(tmp_path)) == []
    for case, defect in zip(cases, BENIGN_DEFECTS):
        plant_defect(layout, str(tmp_path), case, defect, min_size=(12, 12, 12))
    with caplog.at_level(logging.DEBUG, logger="common.data.integrity"):
        report = dataset_report(layout, str(tmp_path), progress=False)
    assert report.problems == [] and report.num_cases >= 4
    assert any("anisotropic voxels" in r.getMessage() for r in caplog.records)  # a DEBUG note, not a problem
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_layout_problems_and_stray_files(tmp_path):
    brats, msd, mosmed = tmp_path / "brats", tmp_path / "msd", tmp_path / "mosmed"
    cases = write("brats2023", brats, 2)
    copy = brats / cases[0] / f"{cases[0]}-t1c (1).nii.gz"
    shutil.copy(brats / cases[0] / f"{cases[0]}-t1c.nii.gz", copy)
    (brats / cases[1] / f"{cases[1]}-t2w.nii.gz").unlink()
    (brats / cases[1] / ".DS_Store").write_text("hidden files are ignored")
    problems = {(p.case, p.path, p.problem) for p in verify_dataset("brats2023", str(brats))}
    assert problems == {
        (cases[0], str(copy), f"unexpected file (expected {cases[0]}-{{t1c,t1n,t2w,t2f,seg}}.nii.gz)"),
        (cases[1], str(brats / cases[1] / f"{cases[1]}-t2w.nii.gz"), f"missing {cases[1]}-t2w.nii.gz"),
    }
    write("msd_task01", msd, 2)
    shutil.copy(msd / "imagesTr" / "BRATS_001.nii.gz", msd / "imagesTr" / "BRATS_099.nii.gz")
    assert [str(p) for p in verify_dataset("msd_task01", str(msd))] == [
        f"BRATS_099: {msd / 'imagesTr' / 'BRATS_099.nii.gz'}: unexpected file (not in dataset.json)"
    ]
    (msd / "dataset.json").unlink()
    (problem,) = verify_dataset("msd_task01", str(msd))
    assert (problem.case, problem.path) == (DATASET, str(msd / "dataset.json")) and "not found" in problem.problem
    studies = write("mosmed", mosmed, 4)
    shutil.copy(mosmed / "masks" / f"{studies[1]}_mask.nii.gz", mosmed / "masks" / "study_0999_mask.nii.gz")
    (mosmed / "studies" / "CT-4").mkdir(exist_ok=True)
    shutil.copy(next(mosmed.rglob(f"{studies[0]}.nii.gz")), mosmed / "studies" / "CT-4" / f"{studies[0]}.nii.gz")
    found = [str(p) for p in verify_dataset("mosmed", str(mosmed))]
    assert found == [
        f"{DATASET}: {mosmed / 'masks' / 'study_0999_mask.nii.gz'}: no matching study studies/CT-*/study_0999.nii.gz",
        f"{studies[0]}: {mosmed / 'studies' / 'CT-4' / f'{studies[0]}.nii.gz'}: in both CT-0 and CT-4",
    ]
    with pytest.raises(DataError, match="data folder not found"):
        verify_dataset("mosmed", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="unknown layout"):
        verify_dataset("brats2019", str(brats))


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    img = nib.Nifti1Image(data, np.eye(4))
    if affine is not None:  # via the sform only: a degenerate affine has no qform
        img.set_qform(None, code=0)
        img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def test_file_sniffing_values_and_grid_majority(tmp_path):
    rng = np.random.default_rng(0)
    mri = [save(tmp_path / f"m{i}.nii.gz", rng.random(SHAPE, dtype=np.float32) + 1) for i in range(3)]
    label = save(tmp_path / "seg.nii.gz", np.zeros(SHAPE, np.uint8))
    item = {"case": "c", "image": [*mri, mri[0]], "label": label}
    assert check_item(item, "brats2021") == []
    # the first file (the naive reference) is the one off the grid: it, and only it, is named
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[0, 3] = 2.0
    off = save(tmp_path / "off.nii.gz", rng.random(SHAPE, dtype=np.float32), shifted)
    assert [
        (p.path, "affine differs" in p.problem) for p in check_item({**item, "image": [off, *mri]}, "brats2021")
    ] == [(off, True)]
    raw = tmp_path / "raw.nii.gz"  # an uncompressed NIfTI under a .nii.gz name
    raw.write_bytes(gzip.decompress(Path(mri[0]).read_bytes()))
    text = tmp_path / "text.nii.gz"
    text.write_bytes(gzip.compress(b"x" * 400))
    zscored = save(tmp_path / "z.nii.gz", rng.standard_normal(SHAPE).astype(np.float32))
    ringing = save(
        tmp_path / "ring.nii.gz",
        np.pad(np.full((14, 16, 16), 100, np.float32), ((1, 1), (0, 0), (0, 0)), constant_values=-2),
    )
    seven = save(tmp_path / "seven.nii.gz", np.full(SHAPE, 7, np.float32))
    flat = save(tmp_path / "flat.nii.gz", rng.random(SHAPE, dtype=np.float32), np.diag([1.0, 0.0, 1.0, 1.0]))
    item = {"case": "c", "image": [str(raw), str(text), zscored, ringing], "label": label}
    found = {Path(p.path).name: p.problem for p in check_item(item, "brats2021")}
    assert found.keys() == {"raw.nii.gz", "text.nii.gz", "z.nii.gz"}  # ringing to -2 % is accepted
    assert found["raw.nii.gz"].startswith("an uncompressed NIfTI file named .nii.gz")
    assert found["text.nii.gz"].startswith("not a NIfTI file (gzip-compressed data")
    assert found["z.nii.gz"].startswith("negative intensities down to")
    found = {Path(p.path).name: p.problem for p in check_item({"image": [seven, flat, mri[0], mri[1]]}, "brats2021")}
    assert found == {"seven.nii.gz": "constant image (every voxel 7)", "flat.nii.gz": found["flat.nii.gz"]}
    assert found["flat.nii.gz"].startswith("degenerate affine")
    # CT: values in [0, 1] are not Hounsfield units; -1024 air is
    scaled = save(tmp_path / "ct01.nii.gz", rng.random(SHAPE, dtype=np.float32))
    hu = save(tmp_path / "ct.nii.gz", (rng.random(SHAPE) * 1400 - 1024).astype(np.int16))
    (problem,) = check_item({"case": "s", "image": scaled}, "mosmed")
    assert problem.problem.startswith("not in Hounsfield units: lowest value")
    assert check_item({"case": "s", "image": hu}, "mosmed") == []


def test_check_item_joins_relative_paths_and_never_raises(tmp_path):
    write("adni_pairs", tmp_path, 1)
    (subject,) = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    mri, pet = (sorted((tmp_path / subject).glob(f"*_{k}_MNI152.nii.gz"))[0].name for k in ("mri", "FDG"))
    item = {"case": "I1", "subject": subject, "mri": f"{subject}/{mri}", "pet": f"{subject}/{pet}"}
    assert check_item(item, "adni_pairs", str(tmp_path)) == []
    (problem,) = check_item({**item, "pet": f"{subject}/absent.nii.gz"}, "adni_pairs", str(tmp_path))
    assert problem == Problem(f"{subject}/I1", str(tmp_path / subject / "absent.nii.gz"), "file not found")
    (problem,) = check_item({"case": "x", "mri": f"{subject}/{mri}"}, "adni_pairs", str(tmp_path))
    assert (problem.case, problem.problem) == ("x", "no 'pet' path")


@pytest.fixture
def listed(tmp_path):
    """A BraTS 2021 datalist of 6 cases; then NaNs planted in one training case and one testing case."""
    data = tmp_path / "data"
    write("brats2021", data, 6)
    datalist = build_datalist("brats2021", str(data), seed=0, val_fraction=0.2, test_fraction=0.2, progress=False)
    path = tmp_path / "datalist.json"
    save_datalist(datalist, path)
    assert verify_datalist(str(path), str(data)) == []
    require_valid_datalist(str(path), str(data))  # clean: no error
    bad = {key: datalist[key][0]["case"] for key in ("training", "testing")}
    files = {key: plant_defect("brats2021", str(data), case, "nan")[0] for key, case in bad.items()}
    return path, data, bad, files


def test_verify_and_require_valid_datalist(listed):
    path, data, bad, files = listed
    problems = verify_datalist(str(path), str(data))
    assert [(p.case, p.path) for p in problems] == [(bad["training"], files["training"])]
    assert [p.path for p in verify_datalist(str(path), str(data), keys=("training", "testing"))] == [
        files["training"],
        files["testing"],
    ]
    with pytest.raises(DataError) as info:
        require_valid_datalist(str(path), str(data), keys=("training", "testing"))
    lines = str(info.value).splitlines()
    assert info.value.path == str(path) and lines[0].endswith("2 data problem(s) in training, testing:")
    assert lines[1:] == [f"{bad[k]}: {files[k]}: contains 5 NaN values" for k in ("training", "testing")]
    path.write_text(json.dumps({"training": [], "validation": []}))
    with pytest.raises(DataError, match="layout None is not one of"):
        verify_datalist(str(path), str(data))


def test_require_valid_datalist_missing_ok_and_rank0_only(listed, tmp_path, monkeypatch):
    path, data, bad, files = listed
    missing = str(tmp_path / "no_datalist.json")
    with pytest.raises(DataError, match="datalist not found"):
        require_valid_datalist(missing, str(data))
    require_valid_datalist(missing, str(data), missing_ok=True)  # MONAI Label: no datalist, nothing to check
    with pytest.raises(DataError, match="1 data problem"):  # a datalist that is there is checked all the same
        require_valid_datalist(str(path), str(data), missing_ok=True)
    # under torchrun only global rank 0 reads the files; the others return at once
    monkeypatch.setenv("RANK", "1")
    require_valid_datalist(str(path), str(data), rank0_only=True)
    with pytest.raises(DataError, match="1 data problem"):
        require_valid_datalist(str(path), str(data))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DataError, match="1 data problem"):
        require_valid_datalist(str(path), str(data), rank0_only=True)
    monkeypatch.delenv("RANK")  # a single process
    with pytest.raises(DataError, match="1 data problem"):
        require_valid_datalist(str(path), str(data), rank0_only=True)


def test_screen_items_skips_bad_cases_with_one_warning_each(listed, caplog):
    path, data, bad, files = listed
    items = load_datalist(str(path), "testing", str(data)) + load_datalist(str(path), "training", str(data))
    with caplog.at_level(logging.WARNING, logger="common.data.integrity"):
        good = screen_items(items, "brats2021")
    assert [it["case"] for it in good] == [it["case"] for it in items if it["case"] not in bad.values()]
    warnings = [r.getMessage() for r in caplog.records if r.name == "common.data.integrity"]
    assert warnings == [f"skipping case {bad[k]}: {files[k]}: contains 5 NaN values" for k in ("testing", "training")]
    bad_items = [it for it in items if it["case"] in bad.values()]
    with pytest.raises(DataError, match=r"no usable case: all 2 failed the integrity check") as info:
        screen_items(bad_items, "brats2021")
    assert info.value.path == str(data)


def test_report_json(planted, tmp_path):
    folder, records, report = planted["brats2021"]
    report.save(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["num_problems"] == len(records) == len(saved["problems"])
    assert [Problem(**p) for p in saved["problems"]] == report.problems
    assert saved["layout"] == "brats2021" and saved["num_cases"] == report.num_cases
