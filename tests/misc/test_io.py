"""Atomic writing: an output appears complete with normal permissions, or not at all; a case's outputs as a set."""

import os
import stat

import pytest
import torch
from monai.data import MetaTensor

from common.data.writers import SaveAsSet, SaveCaseImaged
from common.io import atomic_path, file_set, remove_partial_files


def test_atomic_path_writes_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.endswith("out.nii.gz") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as f:
            f.write("data")
    assert target.read_text() == "data"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask
    assert os.listdir(target.parent) == ["out.nii.gz"]


def test_atomic_path_leaves_nothing_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("last good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "last good"
    assert os.listdir(tmp_path) == ["model.pt"]


def _write(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def test_a_file_set_appears_whole_after_its_last_file(tmp_path):
    seen = []
    with file_set():
        _write(tmp_path / "case_seg.nii.gz", "mask")
        seen.append(sorted(os.listdir(tmp_path)))
        _write(tmp_path / "case_mean.nii.gz", "mean")
        with file_set():  # an inner block joins the outer set
            _write(tmp_path / "case_panel.png", "panel")
        seen.append([f for f in os.listdir(tmp_path) if not f.startswith(".")])
    assert len(seen[0]) == 1 and seen[0][0].startswith(".case_seg.nii.gz.")  # only the hidden temporary file
    assert seen[1] == []  # nothing under a final name until the set is complete
    assert sorted(os.listdir(tmp_path)) == ["case_mean.nii.gz", "case_panel.png", "case_seg.nii.gz"]
    assert (tmp_path / "case_mean.nii.gz").read_text() == "mean"


def test_a_file_set_failing_half_way_leaves_none_of_its_files_and_keeps_older_ones(tmp_path):
    (tmp_path / "case_seg.nii.gz").write_text("previous run")
    with pytest.raises(OSError, match="disk full"), file_set():
        _write(tmp_path / "case_seg.nii.gz", "mask")
        _write(tmp_path / "case_mean.nii.gz", "mean")
        raise OSError("disk full")
    assert os.listdir(tmp_path) == ["case_seg.nii.gz"] and (tmp_path / "case_seg.nii.gz").read_text() == "previous run"


def test_a_rename_failing_in_a_file_set_removes_the_files_already_renamed(tmp_path, monkeypatch):
    real = os.replace

    def fail_second(src, dst):
        if str(dst).endswith("case_mean.nii.gz"):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="rename failed"), file_set():
        _write(tmp_path / "case_seg.nii.gz", "mask")
        _write(tmp_path / "case_mean.nii.gz", "mean")
        _write(tmp_path / "case_uncertainty.nii.gz", "uncertainty")
    assert os.listdir(tmp_path) == []


def test_removing_partial_files_inside_a_file_set_keeps_the_set_s_own(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    stale = tmp_path / ".case_seg.nii.gz.k1ll3d.partial-case_seg.nii.gz"
    stale.write_text("left by a killed run")
    with file_set():
        _write(target, "mask")
        assert remove_partial_files(target) == [str(stale)]
    assert os.listdir(tmp_path) == ["case_seg.nii.gz"]


def test_save_as_set_writes_every_output_of_a_case_or_none(tmp_path):
    img = MetaTensor(torch.ones(1, 4, 4, 4), affine=torch.eye(4))
    writers = [
        SaveCaseImaged("pred", str(tmp_path), postfix="_seg", dtype="uint8"),
        SaveCaseImaged("pred_mean", str(tmp_path), postfix="_mean"),
        SaveCaseImaged("pred_uncertainty", str(tmp_path), postfix="_uncertainty"),
    ]
    SaveAsSet(writers)({"case": "a", "pred": img, "pred_mean": img, "pred_uncertainty": img})
    assert sorted(os.listdir(tmp_path)) == ["a_mean.nii.gz", "a_seg.nii.gz", "a_uncertainty.nii.gz"]
    with pytest.raises(RuntimeError, match="applying transform"):  # the third output is not a MetaTensor
        SaveAsSet(writers)({"case": "b", "pred": img, "pred_mean": img, "pred_uncertainty": torch.ones(1, 4, 4, 4)})
    assert sorted(os.listdir(tmp_path)) == ["a_mean.nii.gz", "a_seg.nii.gz", "a_uncertainty.nii.gz"]
