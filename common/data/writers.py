"""Writing predictions as NIfTI, atomically, named by case.

Why not MONAI's ``SaveImaged``: it writes straight to the final path (a killed run leaves a truncated file)
and names files after the first input file (``BraTS2021_00000_t1ce_seg.nii.gz`` for a 4-file case), while the
collection promises ``<output_dir>/<case>_<postfix>.nii.gz`` and never a partial output.

A run killed (SIGKILL, out of memory) while writing leaves no file under the final name, only the hidden
temporary file of :func:`~common.io.atomic_path`; writing that output again (re-running the case) removes it.

A case with several outputs is written as a set by :class:`SaveAsSet`: all its files appear, or none.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from common.io import atomic_path, file_set, remove_partial_files


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str, dtype: Any = np.float32) -> str:
    """Write ``array`` (spatial dims first, as nibabel stores them) with ``affine`` to ``path`` atomically.

    Both qform and sform carry the affine (code 1, scanner) so nibabel and ITK read the same geometry.
    Temporary files that a killed earlier run left next to ``path`` are removed once it is written.
    """
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    remove_partial_files(path)
    return path


class SaveCaseImaged(MapTransform):
    """Save ``data[key]`` (a channel-first ``MetaTensor``) to ``<output_dir>/<case><postfix>.nii.gz``.

    A single channel is squeezed (a label map is written 3D); several channels are written as a 4D NIfTI with
    channels last, as the public datasets store them. The affine is the tensor's own (after ``Invertd`` it is
    the input's), so outputs overlay their inputs in any viewer.

    Args:
        keys: keys of the tensors to save.
        output_dir: destination folder (created).
        case_key: key of the case id in the data dictionary (the datalists' ``"case"``).
        postfix: appended to the case id, e.g. ``"_seg"``.
        dtype: on-disk type, e.g. ``"uint8"`` for labels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        case_key: str = "case",
        postfix: str = "_seg",
        dtype: Any = "float32",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.case_key = case_key
        self.postfix = postfix
        self.dtype = np.dtype(dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key)
        if case is None:
            raise KeyError(f"SaveCaseImaged needs the case id under {self.case_key!r}; keys are {sorted(map(str, d))}")
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise TypeError(f"SaveCaseImaged: {key!r} must be a MetaTensor carrying its affine, got {type(img)}")
            arr = img.detach().cpu().numpy()
            arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
            affine = img.affine.detach().cpu().numpy() if torch.is_tensor(img.affine) else np.asarray(img.affine)
            path = os.path.join(self.output_dir, f"{case}{self.postfix}.nii.gz")
            save_nifti(arr, affine, path, self.dtype)
            d[f"{key}_file"] = path
        return d


class SaveAsSet(Compose):
    """MONAI's ``Compose`` whose output files appear as a set: all of them once every transform has run, or none.

    For a case with several outputs (MedSegDiff: mask, mean and uncertainty; DC2Fusion: PNG panel and fused NIfTI),
    so that a failure after the first file (a full disk, a transform between two writers) never leaves a partial
    case behind. The writers inside are the usual ones (:class:`SaveCaseImaged`,
    :class:`~common.data.fusion_panel.SaveFusionPaneld`, anything writing through :func:`~common.io.atomic_path`),
    and other transforms (``Invertd``) may sit between them; the chain runs inside :func:`~common.io.file_set`.
    Arguments are ``Compose``'s; in a config, ``"_target_": "common.data.writers.SaveAsSet"`` instead of
    ``"Compose"``.
    """

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        with file_set():
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
