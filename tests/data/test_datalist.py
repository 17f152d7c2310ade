"""Tests for common/data/datalist.py and tools/prepare_datalist.py on tiny files in the real layouts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import (
    MSD_CHANNEL_ORDER,
    build_datalist,
    save_datalist,
    validate_datalist_no_leak,
)
from common.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_datalist.py"
SHAPE = (8, 8, 8)
LISTS = ("training", "validation", "testing")


# ---------------------------------------------------------------- tiny files in the real layouts


def write_nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(len(path.name)).random(SHAPE, dtype=np.float32) if data is None else data
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def label_map(values: tuple[int, ...]) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    for i, v in enumerate(values):
        label[i, 0, 0] = v
    return label


BRATS = {
    "brats2021": ("BraTS2021_{:05d}", "_", ("t1", "t1ce", "t2", "flair"), (1, 2, 4)),
    "brats2023": ("BraTS-GLI-{:05d}-000", "-", ("t1n", "t1c", "t2w", "t2f"), (1, 2, 3)),
}


def make_brats(root: Path, layout: str, n: int, unlabelled: int = 0, prefix: str | None = None) -> list[str]:
    pattern, sep, suffixes, values = BRATS[layout]
    if prefix is not None:
        pattern = pattern.replace("GLI", prefix)
    cases = []
    for i in range(n + unlabelled):
        case = pattern.format(i)
        for s in suffixes:
            write_nifti(root / case / f"{case}{sep}{s}.nii.gz")
        if i < n:
            write_nifti(root / case / f"{case}{sep}seg.nii.gz", label_map(values))
        cases.append(case)
    return cases


def make_msd(root: Path, n_train: int, n_test: int) -> None:
    training, test = [], []
    for i in range(1, n_train + n_test + 1):
        name = f"BRATS_{i:03d}.nii.gz"
        folder = "imagesTr" if i <= n_train else "imagesTs"
        write_nifti(root / folder / name, np.zeros((*SHAPE, 4), np.float32))
        if i <= n_train:
            write_nifti(root / "labelsTr" / name, label_map((1, 2, 3)))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    modality = dict(enumerate(["FLAIR", "T1w", "t1gd", "T2w"]))
    meta = {"name": "BRATS", "modality": {str(k): v for k, v in modality.items()}, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta))


def make_mosmed(root: Path, per_category: int, masked: int) -> dict[str, str]:
    """``per_category`` studies in each of CT-0..CT-4 plus ``masked`` CT-1 studies with masks; study -> category."""
    studies, number = {}, 1
    for k in range(5):
        for _ in range(per_category + (masked if k == 1 else 0)):
            study = f"study_{number:04d}"
            write_nifti(root / "studies" / f"CT-{k}" / f"{study}.nii.gz")
            studies[study] = f"CT-{k}"
            number += 1
    for study in [s for s, c in studies.items() if c == "CT-1"][:masked]:
        write_nifti(root / "masks" / f"{study}_mask.nii.gz", label_map((1, 1)))
    write_nifti(root / "synthetic_truth" / "study_0001_mask.nii.gz")  # another folder: ignored
    return studies


def make_adni(root: Path, subjects: dict[str, list[str]]) -> None:
    for subject, ids in subjects.items():
        for image_id in ids:
            write_nifti(root / subject / f"{image_id}_mri_MNI152.nii.gz")
            write_nifti(root / subject / f"{image_id}_FDG_MNI152.nii.gz")


def all_items(datalist: dict) -> list[dict]:
    return [item for key in LISTS for item in datalist[key]]


def files_of(item: dict) -> list[str]:
    out = []
    for key in ("image", "label", "mri", "pet"):
        value = item.get(key, [])
        out += value if isinstance(value, list) else [value]
    return out


def assert_relative_and_present(datalist: dict, root: Path) -> None:
    for item in all_items(datalist):
        for rel in files_of(item):
            assert not os.path.isabs(rel) and "\\" not in rel and not rel.startswith("./")
            assert (root / rel).is_file(), rel


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_brats_layouts(tmp_path, layout):
    cases = make_brats(tmp_path, layout, n=4, unlabelled=1)
    (tmp_path / "not_a_case").mkdir()
    (tmp_path / "survival_info.csv").write_text("x")
    dl = build_datalist(layout, tmp_path, progress=False)
    assert dl["layout"] == layout and dl["label_convention"] == layout
    assert dl["modalities"] == ["t1c", "t1", "t2", "flair"]
    assert sorted(item["case"] for item in all_items(dl)) == cases
    pattern, sep, (t1, t1c, t2, flair), _ = BRATS[layout]
    for item in all_items(dl):
        c = item["case"]
        assert item["image"] == [f"{c}/{c}{sep}{s}.nii.gz" for s in (t1c, t1, t2, flair)]
    unlabelled = cases[-1]
    assert [i for i in dl["testing"] if i["case"] == unlabelled] == [
        {"case": unlabelled, "image": dl_images(dl, unlabelled)}
    ]
    assert all(item["label"] == f"{item['case']}/{item['case']}{sep}seg.nii.gz" for item in dl["training"])
    assert all(len(dl[key]) >= 1 for key in LISTS)
    assert_relative_and_present(dl, tmp_path)


def dl_images(dl: dict, case: str) -> list[str]:
    return next(item["image"] for item in all_items(dl) if item["case"] == case)


def test_brats2023_other_challenge_prefixes(tmp_path):
    make_brats(tmp_path, "brats2023", n=2, prefix="MEN")
    make_brats(tmp_path, "brats2023", n=1, prefix="PED")
    dl = build_datalist("brats2023", tmp_path, check_data=False)
    assert sorted(i["case"] for i in all_items(dl)) == [
        "BraTS-MEN-00000-000",
        "BraTS-MEN-00001-000",
        "BraTS-PED-00000-000",
    ]


def test_msd_layout(tmp_path):
    make_msd(tmp_path, n_train=5, n_test=2)
    dl = build_datalist("msd_task01", tmp_path, progress=False)
    assert dl["channel_order"] == list(MSD_CHANNEL_ORDER) == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert dl["label_convention"] == "msd_task01" and dl["modalities"] == ["t1c", "t1", "t2", "flair"]
    items = {i["case"]: i for i in all_items(dl)}
    assert sorted(items) == [f"BRATS_{i:03d}" for i in range(1, 8)]
    assert items["BRATS_001"] == {
        "case": "BRATS_001",
        "image": "imagesTr/BRATS_001.nii.gz",
        "label": "labelsTr/BRATS_001.nii.gz",
        "channel_order": ["FLAIR", "T1w", "T1gd", "T2w"],
    }
    assert {i["case"] for i in dl["testing"]} >= {"BRATS_006", "BRATS_007"}
    assert "label" not in items["BRATS_007"] and items["BRATS_007"]["image"] == "imagesTs/BRATS_007.nii.gz"
    assert all("label" in i for i in dl["training"] + dl["validation"])
    assert_relative_and_present(dl, tmp_path)


def test_msd_missing_listed_file_and_dataset_json(tmp_path):
    with pytest.raises(DataError, match="dataset.json: not found"):
        build_datalist("msd_task01", tmp_path)
    make_msd(tmp_path, n_train=3, n_test=1)
    (tmp_path / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        build_datalist("msd_task01", tmp_path, check_data=False)
    assert str(info.value) == "BRATS_002: missing labelsTr/BRATS_002.nii.gz"


def test_mosmed_layout_masked_never_in_training(tmp_path):
    studies = make_mosmed(tmp_path, per_category=3, masked=6)
    dl = build_datalist("mosmed", tmp_path, progress=False)
    items = all_items(dl)
    assert sorted(i["case"] for i in items) == sorted(studies)
    for item in items:
        assert item["category"] == studies[item["case"]]
        assert item["image"] == f"studies/{item['category']}/{item['case']}.nii.gz"
    masked = {i["case"] for i in items if "label" in i}
    assert len(masked) == 6 and all(studies[s] == "CT-1" for s in masked)
    assert all(i["label"] == f"masks/{i['case']}_mask.nii.gz" for i in items if "label" in i)
    assert not any("label" in i for i in dl["training"])
    assert {i["case"] for i in dl["validation"]} & masked and {i["case"] for i in dl["testing"]} & masked
    assert all(len(dl[key]) >= 1 for key in LISTS)
    assert_relative_and_present(dl, tmp_path)
    validate_datalist_no_leak(dl, tmp_path)
    for seed in range(5):  # also with folds, no seed puts a masked study in training
        folded = build_datalist("mosmed", tmp_path, seed=seed, num_folds=3, fold=seed % 3, check_data=False)
        assert not masked & {i["case"] for i in folded["training"]}
        assert masked == {i["case"] for i in all_items(folded) if "label" in i}


def test_mosmed_mask_without_study(tmp_path):
    make_mosmed(tmp_path, per_category=1, masked=1)
    write_nifti(tmp_path / "masks" / "study_0999_mask.nii.gz")
    with pytest.raises(DataError, match=r"masks/study_0999_mask.nii.gz: no matching study"):
        build_datalist("mosmed", tmp_path, check_data=False)


def test_validate_datalist_no_leak(tmp_path):
    make_mosmed(tmp_path, per_category=2, masked=3)
    dl = build_datalist("mosmed", tmp_path, check_data=False)
    leaked = json.loads(json.dumps(dl))
    leaked["training"].append(
        leaked["validation"].pop(next(i for i, it in enumerate(leaked["validation"]) if "label" in it))
    )
    with pytest.raises(DataError, match="has a label"):
        validate_datalist_no_leak(leaked)
    # without the label key the study is still found through its mask on disk
    stripped = {k: v for k, v in leaked["training"][-1].items() if k != "label"}
    leaked["training"][-1] = stripped
    validate_datalist_no_leak(leaked)  # nothing on disk to compare with
    with pytest.raises(DataError, match=rf"training study {stripped['case']} has a mask masks/{stripped['case']}_mask"):
        validate_datalist_no_leak(leaked, tmp_path)
    # a case in two lists, read from a file: the file is named
    twice = json.loads(json.dumps(dl))
    twice["testing"].append(twice["training"][0])
    path = tmp_path / "dl.json"
    save_datalist(twice, path)
    with pytest.raises(
        DataError, match=rf"^{path}: .*case {twice['training'][0]['case']} is in both training and testing"
    ):
        validate_datalist_no_leak(path)
    validate_datalist_no_leak(tmp_path / "none.json", tmp_path, missing_ok=True)  # MONAI Label: no datalist
    with pytest.raises(DataError, match="none.json: not a readable datalist"):
        validate_datalist_no_leak(tmp_path / "none.json", tmp_path)
    with pytest.raises(DataError, match="is in both training and testing"):  # a file that is there is checked
        validate_datalist_no_leak(path, missing_ok=True)


def test_adni_layout_split_by_subject(tmp_path):
    subjects = {f"{i:03d}_S_{i:04d}": [f"I{i}{j}" for j in range(1 + i % 3)] for i in range(8)}
    make_adni(tmp_path, subjects)
    dl = build_datalist("adni_pairs", tmp_path, progress=False)
    items = all_items(dl)
    assert sorted(i["case"] for i in items) == sorted(x for ids in subjects.values() for x in ids)
    for item in items:
        s, c = item["subject"], item["case"]
        assert item == {
            "case": c,
            "subject": s,
            "mri": f"{s}/{c}_mri_MNI152.nii.gz",
            "pet": f"{s}/{c}_FDG_MNI152.nii.gz",
        }
    where = {}
    for key in LISTS:
        for item in dl[key]:
            assert where.setdefault(item["subject"], key) == key  # all pairs of a subject in one list
    assert "label_convention" not in dl and "modalities" not in dl
    assert all(len(dl[key]) >= 1 for key in LISTS)
    validate_datalist_no_leak(dl)


def test_adni_missing_partner(tmp_path):
    make_adni(tmp_path, {"002_S_0001": ["I1"], "002_S_0002": ["I2"]})
    (tmp_path / "002_S_0002" / "I2_FDG_MNI152.nii.gz").unlink()
    with pytest.raises(DataError, match="002_S_0002/I2: missing I2_FDG_MNI152.nii.gz"):
        build_datalist("adni_pairs", tmp_path)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("n", [3, 4, 5, 11])
def test_splits_non_empty_and_deterministic(tmp_path, n):
    make_brats(tmp_path, "brats2021", n=n)
    first = build_datalist("brats2021", tmp_path, seed=7, check_data=False)
    assert first == build_datalist("brats2021", tmp_path, seed=7, check_data=False)
    assert all(len(first[key]) >= 1 for key in LISTS)
    names = [i["case"] for i in all_items(first)]
    assert len(names) == len(set(names)) == n
    if n == 11:
        assert len(first["validation"]) == 2 and len(first["testing"]) == 1
        others = [build_datalist("brats2021", tmp_path, seed=s, check_data=False) for s in range(3)]
        assert any(o["testing"] != first["testing"] or o["validation"] != first["validation"] for o in others)
        # zero fractions give empty lists
        none = build_datalist("brats2021", tmp_path, val_fraction=0.0, test_fraction=0.0, check_data=False)
        assert len(none["training"]) == 11 and not none["validation"] and not none["testing"]


def test_k_folds(tmp_path):
    make_brats(tmp_path, "brats2021", n=10)
    folds = [build_datalist("brats2021", tmp_path, num_folds=3, fold=k, check_data=False) for k in range(3)]
    testing = folds[0]["testing"]
    pool = {i["case"] for i in folds[0]["training"] + folds[0]["validation"]}
    validation_sets = []
    for k, dl in enumerate(folds):
        assert dl["testing"] == testing and dl["num_folds"] == 3 and dl["fold"] == k
        val = {i["case"] for i in dl["validation"]}
        train = {i["case"] for i in dl["training"]}
        assert val and train and not val & train and val | train == pool
        assert all(i["fold"] == k for i in dl["validation"]) and all(i["fold"] != k for i in dl["training"])
        validation_sets.append(val)
    assert set().union(*validation_sets) == pool and sum(map(len, validation_sets)) == len(pool)
    assert not pool & {i["case"] for i in testing} and len(testing) == 1
    with pytest.raises(DataError, match="cannot fill 12 folds"):
        build_datalist("brats2021", tmp_path, num_folds=12, check_data=False)
    with pytest.raises(ValueError, match="fold must be"):
        build_datalist("brats2021", tmp_path, num_folds=3, fold=3, check_data=False)


# ---------------------------------------------------------------- errors


def test_missing_modalities_all_reported(tmp_path):
    cases = make_brats(tmp_path, "brats2021", n=5)
    (tmp_path / cases[3] / f"{cases[3]}_t2.nii.gz").unlink()
    (tmp_path / cases[1] / f"{cases[1]}_flair.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        build_datalist("brats2021", tmp_path)
    message = str(info.value)
    assert "BraTS2021_00003: missing BraTS2021_00003_t2.nii.gz" in message
    assert "BraTS2021_00001: missing BraTS2021_00001_flair.nii.gz" in message
    assert message.startswith(f"{tmp_path}: 2 problems") and "\n" not in message


def test_no_case_found(tmp_path):
    make_brats(tmp_path, "brats2023", n=2)
    with pytest.raises(DataError, match=rf"^{tmp_path}: no brats2021 case folder found"):
        build_datalist("brats2021", tmp_path)
    with pytest.raises(DataError, match="data folder not found"):
        build_datalist("brats2021", tmp_path / "absent")
    with pytest.raises(DataError, match="no studies/ folder"):
        build_datalist("mosmed", tmp_path)


def corrupt(kind: str, root: Path) -> Path:
    """Damage one file of a valid layout in ``root``; return (layout, the damaged file)."""
    if kind == "msd_3d":
        make_msd(root, n_train=3, n_test=0)
        return write_nifti(root / "imagesTr" / "BRATS_002.nii.gz")
    cases = make_brats(root, "brats2021", n=3)
    case = root / cases[1]
    t2 = case / f"{cases[1]}_t2.nii.gz"
    if kind == "truncated":
        raw = t2.read_bytes()
        t2.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        t2.write_text("not an image\n")
    elif kind == "nan":
        data = np.zeros(SHAPE, np.float32)
        data[0, 0, :3] = np.nan
        write_nifti(t2, data)
    elif kind == "affine":
        write_nifti(t2, affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    elif kind == "labels":
        return write_nifti(case / f"{cases[1]}_seg.nii.gz", label_map((1, 3)))
    return t2


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("truncated", "truncated or corrupt image data"),
        ("text", "not a readable NIfTI file"),
        ("nan", "contains 3 NaN values"),
        ("affine", "affine differs from that of"),
        ("labels", "unexpected label values [3] for brats2021 (expected 0, 1, 2, 4)"),
        ("msd_3d", "expected a 4D image with 4 channels, got 3D shape (8, 8, 8)"),
    ],
)
def test_bad_file_named(tmp_path, kind, expected):
    bad = corrupt(kind, tmp_path)
    layout = "msd_task01" if kind == "msd_3d" else "brats2021"
    with pytest.raises(DataError) as info:
        build_datalist(layout, tmp_path, progress=False)
    assert str(info.value).startswith(f"{bad}: ") and expected in str(info.value)
    build_datalist(layout, tmp_path, check_data=False)  # scanning alone does not read the files


def test_all_bad_files_reported_together(tmp_path):
    cases = make_brats(tmp_path, "brats2021", n=4)
    nan = np.full(SHAPE, np.nan, np.float32)
    a = write_nifti(tmp_path / cases[0] / f"{cases[0]}_flair.nii.gz", nan)
    b = write_nifti(tmp_path / cases[2] / f"{cases[2]}_seg.nii.gz", label_map((5,)))
    with pytest.raises(DataError) as info:
        build_datalist("brats2021", tmp_path, progress=False, num_workers=2)
    assert f"{a}: contains 512 NaN values" in str(info.value) and f"{b}: unexpected label values [5]" in str(info.value)


def test_save_datalist_json(tmp_path):
    make_adni(tmp_path / "data", {"S1": ["I1"], "S2": ["I2"], "S3": ["I3"]})
    dl = build_datalist("adni_pairs", tmp_path / "data", check_data=False)
    out = tmp_path / "out" / "datalist.json"
    save_datalist(dl, out)
    assert json.loads(out.read_text()) == dl
    assert os.listdir(out.parent) == ["datalist.json"]


# ---------------------------------------------------------------- command line


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_datalist_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_datalist(tmp_path, monkeypatch, capsys):
    make_mosmed(tmp_path / "mosmed", per_category=1, masked=2)
    out = tmp_path / "dl.json"
    tool = load_tool()
    argv = ["prepare_datalist", "--layout", "mosmed", "--data_dir", str(tmp_path / "mosmed"), "--output", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--seed", "3", "--check_data", "false", "--num_folds", "2"])
    tool.run_cli(tool.prepare_datalist)
    line = capsys.readouterr().out.strip()
    dl = json.loads(out.read_text())
    assert dl == build_datalist("mosmed", tmp_path / "mosmed", seed=3, num_folds=2, check_data=False)
    counts = [f"{len(dl[k])} {k}" for k in LISTS]
    assert line == f"{out}: mosmed, {', '.join(counts)}, fold 0 of 2"
    monkeypatch.setattr(sys, "argv", [*argv, "--val_fraction", "1.5"])
    with pytest.raises(SystemExit) as info:
        tool.run_cli(tool.prepare_datalist)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: prepare_datalist: val_fraction must be in [0, 1), got 1.5"


@pytest.mark.parametrize(
    "kind, layout, expected",
    [
        ("truncated", "brats2021", "truncated"),
        ("msd_3d", "msd_task01", "expected a 4D image"),
        ("nan", "brats2021", "NaN"),
    ],
)
def test_cli_bad_file_exit_2_no_output(tmp_path, kind, layout, expected):
    """The issue's three bad inputs through the real command line: one line naming the file, exit 2, no output."""
    bad = corrupt(kind, tmp_path / "data")
    out = tmp_path / "dl.json"
    cmd = [sys.executable, str(TOOL), "--layout", layout, "--data_dir", str(tmp_path / "data"), "--output", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(cmd + ["--check_data", "true"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and expected in lines[0], result.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["data"]
