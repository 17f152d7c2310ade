"""A PNG panel of an MRI-PET fusion: MRI | PET | fused, in the axial, coronal and sagittal planes.

Written by the DC2Fusion inference (one PNG per case next to the fused NIfTI) so a user sees at a glance what each
source contributed. Volumes are expected in RAS orientation (``Orientationd(axcodes="RAS")``: axes R, A, S), so
the three planes are ``[:, :, z]`` (axial), ``[:, y, :]`` (coronal) and ``[x, :, :]`` (sagittal), each rotated so
that anterior / superior point up. The file is written through :func:`common.io.atomic_path`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.config import KeysCollection  # noqa: E402
from monai.transforms import MapTransform  # noqa: E402

from common.io import atomic_path  # noqa: E402

__all__ = ["PLANES", "SaveFusionPaneld", "orthogonal_slices", "save_fusion_panel"]

PLANES = ("axial", "coronal", "sagittal")


def _volume(x: Any, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = np.asarray(arr, dtype=np.float32)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be one 3D volume (leading singleton axes allowed), got shape {arr.shape}.")
    return arr


def orthogonal_slices(volume: np.ndarray, centre: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal slices of an RAS ``(X, Y, Z)`` volume through ``centre`` (default: middle),
    rotated for display (anterior up in the axial plane, superior up in the others)."""
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}.")
    cx, cy, cz = [s // 2 for s in volume.shape] if centre is None else [int(c) for c in centre]
    return {
        "axial": np.rot90(volume[:, :, cz]),
        "coronal": np.rot90(volume[:, cy, :]),
        "sagittal": np.rot90(volume[cx, :, :]),
    }


def save_fusion_panel(
    mri: Any, pet: Any, fused: Any, path: str, title: str = "", value_range: tuple[float, float] = (0.0, 1.0)
) -> str:
    """Write a 3 x 3 PNG: rows axial / coronal / sagittal, columns MRI (grey), PET (hot), fused (grey).

    All three volumes share one RAS grid (e.g. the network input grid); slices pass through the centre of the
    MRI's foreground (voxels > 0; the grid centre if there is none). Intensities are shown over ``value_range``
    (default [0, 1], the DC2Fusion input scale).

    Returns:
        ``path``.
    """
    volumes = {"MRI": _volume(mri, "mri"), "PET": _volume(pet, "pet"), "fused": _volume(fused, "fused")}
    shapes = {name: v.shape for name, v in volumes.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"mri, pet and fused must share one shape, got {shapes}.")
    foreground = np.argwhere(volumes["MRI"] > 0)
    centre = foreground.mean(axis=0).round().astype(int) if len(foreground) else None
    slices = {name: orthogonal_slices(v, centre) for name, v in volumes.items()}
    cmaps = {"MRI": "gray", "PET": "hot", "fused": "gray"}
    fig, axes = plt.subplots(len(PLANES), len(volumes), figsize=(3.0 * len(volumes), 3.0 * len(PLANES)))
    for row, plane in enumerate(PLANES):
        for col, name in enumerate(volumes):
            ax = axes[row, col]
            ax.imshow(slices[name][plane], cmap=cmaps[name], vmin=value_range[0], vmax=value_range[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(plane, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


class SaveFusionPaneld(MapTransform):
    """Write :func:`save_fusion_panel` of ``data[mri_key]``, ``data[pet_key]`` and each key (the fused output) to
    ``<output_dir>/<case><postfix>.png``; the data pass through unchanged (plus ``<key>_panel``, the PNG path).

    Place it in a postprocessing chain before ``Invertd``, while the prediction and the preprocessed sources are
    on one grid.

    Args:
        keys: the fused volumes, e.g. ``"pred"`` (channel-first, one channel).
        mri_key: key of the MRI (default ``"mri"``).
        pet_key: key of the PET (default ``"pet"``).
        output_dir: destination folder (created).
        case_key: key of the case id (default ``"case"``).
        postfix: appended to the case id (default ``"_panel"``).
        value_range: display range (default (0, 1)).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        mri_key: str = "mri",
        pet_key: str = "pet",
        case_key: str = "case",
        postfix: str = "_panel",
        value_range: Sequence[float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(value_range) != 2 or value_range[1] <= value_range[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
        self.output_dir = output_dir
        self.mri_key, self.pet_key, self.case_key = mri_key, pet_key, case_key
        self.postfix = postfix
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key)
        if case is None:
            raise KeyError(
                f"SaveFusionPaneld needs the case id under {self.case_key!r}; keys are {sorted(map(str, d))}"
            )
        for key in self.key_iterator(d):
            path = os.path.join(self.output_dir, f"{case}{self.postfix}.png")
            d[f"{key}_panel"] = save_fusion_panel(
                d[self.mri_key], d[self.pet_key], d[key], path, title=f"case {case}", value_range=self.value_range
            )
        return d
