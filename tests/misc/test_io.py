"""Atomic writing: an output appears complete with normal permissions, or not at all."""

import os
import stat

import pytest

from common.io import atomic_path


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
