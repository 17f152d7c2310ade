"""Dataset layouts (common/data/layouts): the registry, and a new layout defined in this file only.

The toy lung CT layout below is registered from the test; the datalist tool, the integrity check (its tool too),
the datalist loader, the synthetic writer and the defect planter pick it up by name, with no change to their code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import build_datalist, validate_datalist_no_leak
from common.data.decathlon import datalist_info, load_datalist
from common.data.integrity import require_valid_datalist
from common.data.layouts import (
    ANY,
    BUILTIN,
    HOUNSFIELD,
    LAYOUTS,
    TEST,
    DatasetLayout,
    LayoutScan,
    Problem,
    get_layout,
    layout_names,
    path_keys,
    register_layout,
    unregister_layout,
)
from common.data.layouts.base import posix_path, stray_problems, subfolders, visible_entries
from common.data.synthetic.defects import DEFECTS, applicable_defects, plant_defect
from common.data.synthetic.write import write_nifti, write_synthetic_dataset
from common.errors import DataError

TOOLS = Path(__file__).resolve().parents[2] / "tools"
LISTS = ("training", "validation", "testing")

# ------------------------------------------------------------------ a toy lung CT collection, defined only here

_FILE = re.compile(r"(scan_\d+)_(ct|lesion)\.nii\.gz")


def scan_toy_lung_ct(data_dir: str) -> LayoutScan:
    """``DIR/<patient>/scan_XXX_ct.nii.gz`` with an optional ``scan_XXX_lesion.nii.gz`` (binary mask)."""
    scan = LayoutScan()
    for patient in subfolders(data_dir):
        folder = os.path.join(data_dir, patient)
        scan.stray += stray_problems(patient, folder, _FILE.fullmatch, "expected scan_XXX_{ct,lesion}.nii.gz")
        found: dict[str, dict[str, str]] = {}
        for name in (e.name for e in visible_entries(folder)):
            match = _FILE.fullmatch(name)
            if match:
                found.setdefault(match.group(1), {})[match.group(2)] = posix_path(patient, name)
        for scan_id, files in sorted(found.items()):
            if "ct" not in files:
                name = f"{scan_id}_ct.nii.gz"
                scan.problems.append(Problem(scan_id, os.path.join(folder, name), f"missing {name}"))
                continue
            item = {"case": scan_id, "patient": patient, "ct": files["ct"]}
            if "lesion" in files:
                item["label"] = files["lesion"]
            scan.items.append(item)
    return scan


def write_toy_lung_ct(output_dir, num_cases=4, shape=(16, 16, 8), seed=0, progress=True, lesion_hu=-300.0):
    """Two scans per patient, in HU (air -1000, body 40, lungs -850, lesions ``lesion_hu``); the second scan of
    every third patient has no lesion mask. Returns the scan ids."""
    ids = []
    for index in range(num_cases):
        rng = np.random.default_rng([seed, index])
        scan_id, patient = f"scan_{index:03d}", f"patient_{index // 2:02d}"
        ct = np.full(shape, -1000, dtype=np.int16)
        ct[2:-2, 2:-2, 1:-1] = 40
        ct[3:-3, 3:-3, 2:-2] = -850
        lesion = np.zeros(shape, dtype=np.uint8)
        x = int(rng.integers(4, shape[0] - 6))
        lesion[x : x + 2, 4:6, 3:5] = 1
        ct[lesion > 0] = lesion_hu
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        write_nifti(os.path.join(output_dir, patient, f"{scan_id}_ct.nii.gz"), ct, affine)
        if index % 6 != 5:
            write_nifti(os.path.join(output_dir, patient, f"{scan_id}_lesion.nii.gz"), lesion, affine)
        ids.append(scan_id)
    return ids


TOY = DatasetLayout(
    name="toy_lung_ct",
    scan=scan_toy_lung_ct,
    image_keys=("ct",),
    value_rule=HOUNSFIELD,
    group_key="patient",
    labelled_role=ANY,
    unlabelled_role=TEST,
    synthetic_writer=write_toy_lung_ct,
    synthetic_shape=(16, 16, 8),
)


@pytest.fixture
def toy():
    register_layout(TOY)
    yield TOY.name
    unregister_layout(TOY.name)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, monkeypatch, *args: str) -> None:
    """``tools/<name>.py ARGS`` as its command line runs it (fire and all), in this process."""
    tool = load_tool(name)
    monkeypatch.setattr(sys, "argv", [name, *args])
    tool.run_cli(getattr(tool, name))


# ------------------------------------------------------------------ the new layout through the tools


def test_new_layout_through_the_datalist_tool(toy, tmp_path, monkeypatch, capsys):
    data = tmp_path / "lungs"
    scans = write_synthetic_dataset(toy, str(data), 12, seed=0, progress=False, lesion_hu=-250.0)
    # the generator option reached the writer: the CT under each lesion is at the requested HU
    ct = nib.load(data / "patient_00" / "scan_000_ct.nii.gz").get_fdata()
    lesion = nib.load(data / "patient_00" / "scan_000_lesion.nii.gz").get_fdata() > 0
    assert lesion.any() and np.all(ct[lesion] == -250)

    out = tmp_path / "datalist.json"
    run_tool("prepare_datalist", monkeypatch, "--layout", toy, "--data_dir", str(data), "--output", str(out))
    assert capsys.readouterr().out.startswith(f"{out}: {toy}, ")
    datalist = json.loads(out.read_text())
    assert datalist == build_datalist(toy, data, progress=False)
    assert datalist["layout"] == toy and set(datalist) == {"layout", "seed", *LISTS}  # no brain header
    items = {it["case"]: (key, it) for key in LISTS for it in datalist[key]}
    assert sorted(items) == scans and all(datalist[key] for key in LISTS)
    # unlabelled scans are test data only
    assert all(key == "testing" for key, it in items.values() if "label" not in it)
    # split by patient: both scans of a patient are in one list
    lists_of = {}
    for key, it in items.values():
        lists_of.setdefault(it["patient"], set()).add(key)
    assert all(len(keys) == 1 for keys in lists_of.values()), lists_of
    validate_datalist_no_leak(datalist, data)
    # the loader joins the layout's own path key ("ct") onto the data folder
    assert "ct" in path_keys()
    loaded = load_datalist(str(out), "training", str(data))
    assert loaded and all(os.path.isfile(it["ct"]) and os.path.isfile(it["label"]) for it in loaded)
    info = datalist_info(str(out))
    assert info["layout"] == toy and info["channel_reorder"] is None


def test_new_layout_through_the_integrity_check(toy, tmp_path, monkeypatch, capsys):
    data = tmp_path / "lungs"
    write_synthetic_dataset(toy, str(data), 6, seed=1, progress=False)
    run_tool("verify_dataset", monkeypatch, "--layout", toy, "--data_dir", str(data), "--progress", "false")
    assert capsys.readouterr().out == "6 cases checked, no problems\n"
    build = tmp_path / "datalist.json"
    build.write_text(json.dumps(build_datalist(toy, data, seed=0, test_fraction=0.0, progress=False)))

    assert set(applicable_defects(toy)) == set(DEFECTS)  # it has labels, and a case outlives its CT file
    (bad_label,) = plant_defect(toy, str(data), "scan_000", "bad_label_values")
    (gone,) = plant_defect(toy, str(data), "scan_004", "missing_modality")
    rescaled = data / "patient_01" / "scan_003_ct.nii.gz"  # a CT normalised to [0, 1]: not in HU
    image = nib.load(rescaled)
    write_nifti(str(rescaled), (image.get_fdata(dtype=np.float32) + 1000) / 1040, image.affine)
    with pytest.raises(SystemExit) as info:
        run_tool("verify_dataset", monkeypatch, "--layout", toy, "--data_dir", str(data), "--progress", "false")
    assert info.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"scan_000: {bad_label}: unexpected label values [2] for a binary mask (expected 0, 1)"
    assert lines[1].startswith(f"scan_003: {rescaled}: not in Hounsfield units: lowest value 0 > -500")
    assert lines[2] == f"scan_004: {gone}: missing scan_004_ct.nii.gz"
    assert lines[3:] == ["3 problems found (3 of 6 cases affected)"]
    # training's check reads the layout from the datalist
    with pytest.raises(DataError, match="scan_000.*unexpected label values \\[2\\] for a binary mask"):
        require_valid_datalist(str(build), str(data), keys=LISTS)


# ------------------------------------------------------------------ the registry


def test_registry(toy):
    assert LAYOUTS == ("brats2021", "brats2023", "msd_task01", "mosmed", "adni_pairs")
    assert layout_names() == (*LAYOUTS, toy) and tuple(layout.name for layout in BUILTIN) == LAYOUTS
    assert get_layout(toy) is TOY and get_layout(TOY) is TOY
    with pytest.raises(ValueError, match="already registered"):
        register_layout(TOY)
    with pytest.raises(ValueError, match=f"unknown layout 'lung'; expected one of brats2021, .*, adni_pairs, {toy}$"):
        get_layout("lung")
    unregister_layout(toy)
    with pytest.raises(ValueError, match="unknown layout 'toy_lung_ct'"):
        build_datalist(toy, ".")
    register_layout(TOY)  # for the fixture's teardown


def test_layout_definitions_are_checked():
    with pytest.raises(ValueError, match="unknown label convention 'brats2024'"):
        DatasetLayout(name="x", scan=scan_toy_lung_ct, label_convention="brats2024")
    with pytest.raises(ValueError, match="value_rule"):
        DatasetLayout(name="x", scan=scan_toy_lung_ct, value_rule="z-scored")
    with pytest.raises(ValueError, match="split roles"):
        DatasetLayout(name="x", scan=scan_toy_lung_ct, labelled_role="training")
    with pytest.raises(ValueError, match="synthetic_shape"):
        DatasetLayout(name="x", scan=scan_toy_lung_ct, synthetic_writer=write_toy_lung_ct)


def test_builtin_layouts_hold_their_rules():
    """The facts each built-in layout states, as the README's table and the datalist docs give them."""
    brats21, brats23, msd, mosmed, adni = BUILTIN
    assert [b.label_convention for b in (brats21, brats23, msd)] == ["brats2021", "brats2023", "msd_task01"]
    assert brats21.image_files == brats23.image_files == 4 and msd.image_files is None
    assert msd.channel_order == ("FLAIR", "T1w", "T1gd", "T2w") and msd.channel_reorder == (2, 1, 3, 0)
    assert mosmed.value_rule == HOUNSFIELD and {b.value_rule for b in (brats21, msd, adni)} == {"non_negative"}
    assert mosmed.split_role({"label": "m"}) == "eval" and mosmed.split_role({}) == ANY
    assert msd.split_role({}) == TEST and adni.split_role({}) == ANY and adni.group_key == "subject"
    assert adni.path_keys == ("mri", "pet") and path_keys()[:4] == ("image", "label", "mri", "pet")
