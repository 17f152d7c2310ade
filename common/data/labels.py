"""Brain tumour label conventions, converted in one place.

Three label conventions meet in this collection (see ``METHODS.md``, "Label conventions"):

============  =====================  =======  =========  ===========  ===========  ========
convention    necrotic / non-enh.    edema    enhancing  TC           WT           ET
============  =====================  =======  =========  ===========  ===========  ========
brats2021     1                      2        4          1 | 4        1 | 2 | 4    4
brats2023     1                      2        3          1 | 3        1 | 2 | 3    3
msd_task01    2                      1        3          2 | 3        1 | 2 | 3    3
============  =====================  =======  =========  ===========  ===========  ========

``brats2021`` covers BraTS 2018-2021 (label 3 is unused), ``brats2023`` the BraTS 2023+ challenges
(enhancing = 3) and ``msd_task01`` the Medical Segmentation Decathlon Task01_BrainTumour, whose
edema and non-enhancing labels are swapped with respect to BraTS.

Networks predict the three nested regions, channel order **TC, WT, ET** (tumour core, whole tumour,
enhancing tumour), as in the BraTS evaluation. :func:`labels_to_regions` maps a label map to those
channels and :func:`regions_to_labels` maps them back, for saving predictions in the dataset's own
convention. MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` is not reused because it hard-codes
the 2018-2021 values and has no inverse.

The collection's standard brain channel order is :data:`BRAIN_MODALITIES` (T1c, T1, T2, FLAIR).
MSD stores one 4D file per case with channels FLAIR, T1w, T1gd, T2w; :class:`ReorderChannelsd` with
:data:`MSD_TO_STANDARD` brings such images to the standard order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, get_equivalent_dtype

from common.errors import DataError

__all__ = [
    "BRAIN_MODALITIES",
    "LABEL_CONVENTIONS",
    "MSD_TO_STANDARD",
    "REGION_NAMES",
    "LabelConvention",
    "LabelsToRegionsd",
    "RegionsToLabelsd",
    "ReorderChannelsd",
    "check_binary_mask",
    "check_label_values",
    "get_label_convention",
    "labels_to_regions",
    "region_names_of",
    "regions_to_labels",
    "select_regions",
]

#: Output channel order of every brain tumour network in the collection.
REGION_NAMES: tuple[str, str, str] = ("TC", "WT", "ET")

#: The collection's standard order of the four brain MRI modalities (image channels).
BRAIN_MODALITIES: tuple[str, str, str, str] = ("t1c", "t1", "t2", "flair")

#: Channel permutation taking an MSD Task01 image (FLAIR, T1w, T1gd, T2w) to :data:`BRAIN_MODALITIES`:
#: ``standard = msd[list(MSD_TO_STANDARD)]``.
MSD_TO_STANDARD: tuple[int, int, int, int] = (2, 1, 3, 0)


@dataclass(frozen=True)
class LabelConvention:
    """Label values of one dataset convention and the label sets making up the three regions.

    Args:
        name: the convention's name, a key of :data:`LABEL_CONVENTIONS`.
        core: value of the necrotic / non-enhancing tumour core.
        edema: value of the peritumoural edema.
        enhancing: value of the enhancing tumour.
    """

    name: str
    core: int
    edema: int
    enhancing: int

    @property
    def values(self) -> tuple[int, ...]:
        """All valid label values, background 0 included, sorted."""
        return tuple(sorted((0, self.core, self.edema, self.enhancing)))

    @property
    def regions(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Label values forming TC, WT and ET, in that (channel) order."""
        return (self.core, self.enhancing), (self.core, self.edema, self.enhancing), (self.enhancing,)


#: The three supported conventions, by name.
LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    "brats2021": LabelConvention("brats2021", core=1, edema=2, enhancing=4),
    "brats2023": LabelConvention("brats2023", core=1, edema=2, enhancing=3),
    "msd_task01": LabelConvention("msd_task01", core=2, edema=1, enhancing=3),
}


def region_names_of(channels: Sequence[int]) -> list[str]:
    """The names (:data:`REGION_NAMES`) of the region channels ``channels`` keeps, e.g. ``[1] -> ["WT"]``."""
    return [REGION_NAMES[i] for i in channels]


def select_regions(channels: Sequence[int]) -> Callable[[NdarrayOrTensor], NdarrayOrTensor]:
    """A function for MONAI's ``Lambdad``: regions ``(3, *spatial)`` (:data:`REGION_NAMES` order) -> the channels
    ``channels``, ``(len(channels), *spatial)``, same type and meta data (picklable, for DataLoader workers)."""
    return partial(_select_channels, channels=list(channels))


def _select_channels(regions: NdarrayOrTensor, channels: list[int]) -> NdarrayOrTensor:
    return regions[channels]


def get_label_convention(convention: str | LabelConvention) -> LabelConvention:
    """Return the :class:`LabelConvention` named ``convention`` (a convention object is returned as is)."""
    if isinstance(convention, LabelConvention):
        return convention
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(LABEL_CONVENTIONS)}")
    return LABEL_CONVENTIONS[convention]


def _spatial(label: NdarrayOrTensor) -> NdarrayOrTensor:
    """Drop a leading channel axis of size 1 (``(1, *spatial)`` with 2 or 3 spatial dims)."""
    if label.ndim in (3, 4) and label.shape[0] == 1:
        return label[0]
    return label


def labels_to_regions(
    label: NdarrayOrTensor, convention: str | LabelConvention, dtype: DtypeLike | torch.dtype = None
) -> NdarrayOrTensor:
    """Convert a label map to the three nested tumour regions TC, WT, ET.

    Shapes: ``(*spatial)`` or ``(1, *spatial)`` -> ``(3, *spatial)``. A leading axis of size 1 is taken
    as the channel axis when the input has 3 or 4 dimensions (a channel-first 2D or 3D label map).

    Args:
        label: integer-valued label map, numpy array or torch tensor (MetaTensor metadata is kept).
        convention: a key of :data:`LABEL_CONVENTIONS` or a :class:`LabelConvention`.
        dtype: output dtype (numpy or torch); default ``bool``.

    Returns:
        the regions, channel order :data:`REGION_NAMES`, same array type and device as ``label``.
    """
    conv = get_label_convention(convention)
    spatial = _spatial(label)
    if isinstance(spatial, torch.Tensor):
        spatial = spatial.as_tensor() if hasattr(spatial, "as_tensor") else spatial
        out = torch.stack([reduce(torch.logical_or, [spatial == v for v in vals]) for vals in conv.regions])
    else:
        spatial = np.asarray(spatial)
        out = np.stack([reduce(np.logical_or, [spatial == v for v in vals]) for vals in conv.regions])
    dtype = bool if dtype is None else dtype
    out_dtype = get_equivalent_dtype(dtype, type(out))
    return convert_to_dst_type(out, label, dtype=out_dtype)[0]


def regions_to_labels(
    regions: NdarrayOrTensor,
    convention: str | LabelConvention,
    threshold: float = 0.5,
    keepdim: bool = True,
    dtype: DtypeLike | torch.dtype = None,
) -> NdarrayOrTensor:
    """Convert TC, WT, ET region channels back to a label map in ``convention``.

    Shapes: ``(3, *spatial)`` -> ``(1, *spatial)`` (``keepdim=True``) or ``(*spatial)``.

    A voxel becomes the enhancing value if ET is on; otherwise the necrotic / non-enhancing value if TC
    is on; otherwise the edema value if WT is on; otherwise 0. Predictions whose regions do not nest
    (e.g. ET on but WT off) are therefore resolved with the priority **ET > TC > WT**. On region maps
    made by :func:`labels_to_regions` from a valid label map the round trip is exact.

    Args:
        regions: region channels in :data:`REGION_NAMES` order, boolean, binary or probabilities.
        convention: a key of :data:`LABEL_CONVENTIONS` or a :class:`LabelConvention`.
        threshold: a channel is "on" where it is greater than this (so sigmoid outputs can be passed).
        keepdim: keep a leading channel axis of size 1 (MONAI's channel-first convention).
        dtype: output dtype (numpy or torch); default ``uint8``.
    """
    conv = get_label_convention(convention)
    if regions.ndim < 2 or regions.shape[0] != len(REGION_NAMES):
        raise ValueError(f"expected regions of shape (3, *spatial) in order {REGION_NAMES}, got {tuple(regions.shape)}")
    if isinstance(regions, torch.Tensor):
        plain = regions.as_tensor() if hasattr(regions, "as_tensor") else regions
        on = plain.float() > threshold
        out = torch.zeros(on.shape[1:], dtype=torch.uint8, device=on.device)
    else:
        on = np.asarray(regions).astype(np.float32) > threshold
        out = np.zeros(on.shape[1:], dtype=np.uint8)
    tc, wt, et = on[0], on[1], on[2]
    # written from the lowest to the highest priority so that later writes win: ET > TC > WT
    out[wt] = conv.edema
    out[tc] = conv.core
    out[et] = conv.enhancing
    if keepdim:
        out = out[None]
    dtype = np.uint8 if dtype is None else dtype
    return convert_to_dst_type(out, regions, dtype=get_equivalent_dtype(dtype, type(out)))[0]


def _format_values(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _check_values(label: NdarrayOrTensor, allowed: Sequence[int], what: str, path: str | os.PathLike) -> None:
    data = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    # isin against the few allowed values is much cheaper than np.unique over a whole volume
    bad = data[~np.isin(data, allowed)]
    if bad.size:
        raise DataError(
            path,
            f"unexpected label values [{_format_values(np.unique(bad))}] for {what} (expected {_format_values(allowed)})",
        )


def check_label_values(
    label: NdarrayOrTensor, convention: str | LabelConvention, path: str | os.PathLike = "label"
) -> None:
    """Raise :class:`~common.errors.DataError` naming ``path`` if ``label`` holds a value outside ``convention``.

    Example message: ``"seg.nii.gz: unexpected label values [5] for brats2021 (expected 0, 1, 2, 4)"``.
    """
    conv = get_label_convention(convention)
    _check_values(label, conv.values, conv.name, path)


def check_binary_mask(mask: NdarrayOrTensor, path: str | os.PathLike = "mask") -> None:
    """Raise :class:`~common.errors.DataError` naming ``path`` if ``mask`` holds values other than 0 and 1."""
    _check_values(mask, (0, 1), "a binary mask", path)


class LabelsToRegionsd(MapTransform):
    """Dictionary transform: label map ``(1, *spatial)`` -> regions ``(3, *spatial)`` (TC, WT, ET).

    See :func:`labels_to_regions`. MetaTensor metadata (affine, applied operations) is kept. Usable from a
    bundle config::

        {"_target_": "common.data.labels.LabelsToRegionsd", "keys": "label", "convention": "brats2021"}

    Args:
        keys: keys of the label maps to convert.
        convention: a key of :data:`LABEL_CONVENTIONS`.
        dtype: output dtype; default ``bool``.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        convention: str,
        dtype: DtypeLike | torch.dtype = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convention = get_label_convention(convention)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = labels_to_regions(d[key], self.convention, dtype=self.dtype)
        return d


class RegionsToLabelsd(MapTransform):
    """Dictionary transform: regions ``(3, *spatial)`` (TC, WT, ET) -> label map ``(1, *spatial)``.

    See :func:`regions_to_labels` (overlaps resolved ET > TC > WT). MetaTensor metadata is kept, so the
    result can go straight to ``SaveImaged``.

    Args:
        keys: keys of the region maps to convert.
        convention: a key of :data:`LABEL_CONVENTIONS`: the label values to write.
        threshold: a region channel is on where it is greater than this.
        dtype: output dtype; default ``uint8``.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        convention: str,
        threshold: float = 0.5,
        dtype: DtypeLike | torch.dtype = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convention = get_label_convention(convention)
        self.threshold = float(threshold)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = regions_to_labels(d[key], self.convention, threshold=self.threshold, dtype=self.dtype)
        return d


class ReorderChannelsd(MapTransform):
    """Dictionary transform permuting the channels of channel-first images: ``out[i] = in[order[i]]``.

    Shapes: ``(C, *spatial)`` -> ``(C, *spatial)`` with ``C == len(order)``. Used to bring MSD Task01
    images (FLAIR, T1w, T1gd, T2w) to the standard order T1c, T1, T2, FLAIR with
    ``order = MSD_TO_STANDARD = (2, 1, 3, 0)``; in a bundle config (or write ``"order": [2, 1, 3, 0]``)::

        "imports": ["$from common.data.labels import MSD_TO_STANDARD"],
        ...
        {"_target_": "common.data.labels.ReorderChannelsd", "keys": "image", "order": "$MSD_TO_STANDARD"}

    MetaTensor metadata is kept. MONAI has no channel permutation transform (``SplitDim`` +
    ``ConcatItemsd`` would need one key per channel).

    Args:
        keys: keys of the images to reorder.
        order: a permutation of ``range(C)``, or ``None`` to leave the channels as they are (so a bundle can
            pass the datalist's ``channel_reorder``, which is ``None`` for the BraTS layouts).
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, order: Sequence[int] | None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.order: tuple[int, ...] | None = None
        if order is None:
            return
        order = tuple(int(i) for i in order)
        if sorted(order) != list(range(len(order))) or not order:
            raise ValueError(f"order must be a permutation of 0..{len(order) - 1}, got {order}")
        self.order = order

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.order is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim < 2 or img.shape[0] != len(self.order):
                raise ValueError(
                    f"{key!r}: expected a channel-first image with {len(self.order)} channels, "
                    f"got shape {tuple(img.shape)}"
                )
            plain = img.as_tensor() if hasattr(img, "as_tensor") else img
            d[key] = convert_to_dst_type(plain[list(self.order)], img)[0]
        return d
