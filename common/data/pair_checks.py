"""Checks of co-registered image pairs inside a MONAI transform chain (e.g. ADNI MRI and FDG-PET in MNI152).

A fusion network compares its inputs voxel by voxel, so a PET on another grid, a 4D (dynamic) PET or a volume with
NaNs gives nonsense or a shape error deep inside the network. :class:`CheckSameGridd` stops such a case right
after loading with a :class:`~common.errors.DataError` that names the file and the problem.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.errors import DataError

__all__ = ["CheckSameGridd"]


def _filename(img: Any, fallback: str) -> str:
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj", fallback)
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


class CheckSameGridd(MapTransform):
    """Check that channel-first images share one voxel grid; raise :class:`~common.errors.DataError` otherwise.

    For every key (after ``LoadImaged`` + ``EnsureChannelFirstd``): ``channels`` channels, all values finite, and
    the spatial shape and affine of the first key. Data pass through unchanged. The error names the offending
    file (the MetaTensor's ``filename_or_obj``, else the key).

    Args:
        keys: the images to compare; the first is the reference, e.g. ``["mri", "pet"]``.
        channels: required number of channels (default 1: one 3D volume per modality); None skips the check.
        atol: tolerance on affine entries, in mm (default 1e-3).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self, keys: KeysCollection, channels: int | None = 1, atol: float = 1e-3, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be positive or None, got {channels}.")
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol}.")
        self.channels = channels
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference: tuple[str, tuple[int, ...], np.ndarray | None] | None = None
        for key in self.key_iterator(d):
            img = d[key]
            path = _filename(img, str(key))
            arr = torch.as_tensor(img)
            if self.channels is not None and (arr.ndim != 4 or arr.shape[0] != self.channels):
                raise DataError(
                    path,
                    f"expected one 3D volume ({self.channels} channel(s) after EnsureChannelFirstd), "
                    f"got array shape {tuple(arr.shape)}",
                )
            if not torch.isfinite(arr).all():
                raise DataError(path, "contains NaN or infinite values")
            affine = img.affine.detach().cpu().numpy() if isinstance(img, MetaTensor) else None
            spatial = tuple(int(s) for s in arr.shape[1:])
            if reference is None:
                reference = (path, spatial, affine)
                continue
            ref_path, ref_shape, ref_affine = reference
            if spatial != ref_shape:
                raise DataError(path, f"grid {spatial} differs from {ref_shape} of {ref_path}; register the pair first")
            if affine is not None and ref_affine is not None and not np.allclose(affine, ref_affine, atol=self.atol):
                raise DataError(
                    path, f"affine differs from that of {ref_path} (not on the same grid); register the pair first"
                )
        return d
