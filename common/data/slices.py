"""Axial slices of preprocessed volumes as a 2D dataset, and batches that hold both slice classes.

The TransUNet of the COVID-19 pipeline (El Fahsi et al., on the pseudo-masks of Shabani et al., Computers in
Biology and Medicine 2022) is a 2D network trained on the axial slices of lung-cropped volumes. Its
segmentation phase sees the slices that hold lung; its contrastive phase sees the slices labelled "high" or
"low" pseudo-lesion burden (:func:`common.data.pseudo_masks.slice_classes`), in batches that hold both
classes, because a supervised contrastive loss over a one-class batch has no negatives (the defect of the
public code, where the term was ~0).

Why not MONAI's ``GridPatchDataset`` / ``PatchIterd`` with ``(1, H, W)`` patches: they are iterable datasets
(no shuffling, no sampler), and cannot restrict the slices to a chosen subset with per-slice labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset, Sampler

from common.errors import DataError

__all__ = ["BalancedClassBatchSampler", "VolumeSliceDataset", "in_plane_size", "samples_per_volume", "volume_roi_size"]


def _plain(x: Any) -> Any:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def volume_roi_size(roi_size: Sequence[int], depth: int) -> list[int]:
    """The 3D spatial size of a transform on the volume for a network of ``roi_size``: a 2D ``(H, W)`` roi (a
    network on axial slices) gets ``depth`` as its last axis (``-1``: the whole depth, for ``Resized``; ``1``: one
    slice, for a crop); a 3D roi is the size itself."""
    return list(roi_size) + [depth] if len(roi_size) == 2 else list(roi_size)


def samples_per_volume(roi_size: Sequence[int], slices_per_volume: int) -> int:
    """How many crops to take per volume: ``slices_per_volume`` slices for a 2D ``roi_size``, one 3D crop else."""
    return slices_per_volume if len(roi_size) == 2 else 1


def in_plane_size(roi_size: Sequence[int]) -> list[int]:
    """The ``(H, W)`` of a ``(D, H, W)`` roi: the ``roi_size`` of MONAI's ``SliceInferer`` with ``spatial_dim=0``."""
    return list(roi_size[1:])


class VolumeSliceDataset(Dataset):
    """2D samples ``(C, H, W)`` cut from channel-first volumes ``(C, Z, H, W)`` along the first spatial axis.

    Each sample is a dict with, for every key of ``keys``, the slice as a plain ``torch.Tensor`` (no meta data:
    the 3D affine does not describe a slice), plus ``case`` (``volume[case_key]``), ``slice`` (its index) and,
    with ``slice_classes``, ``class_key`` (the slice's class as a 0-d int64 tensor). ``transform`` (e.g.
    MONAI 2D random flips) runs on that dict.

    Which slices, in this order of precedence:

    - ``slice_classes`` given: the slices whose class is >= 0 (``{case: [class per slice]}``, e.g. the
      ``"class"`` lists of :func:`common.data.pseudo_masks.load_slice_classes`; -1 = not used);
    - ``lung_key`` given: the slices where ``volume[lung_key]`` has a non-zero voxel;
    - otherwise every slice.

    The volumes are read once when the dataset is built, to list the slices (cheap with a ``CacheDataset``).

    Args:
        volumes: a sequence (e.g. a MONAI ``CacheDataset``) of dicts holding ``(C, Z, H, W)`` arrays.
        keys: the keys to cut; all must have the same number of slices.
        slice_classes: per case, one class per slice (>= 0 to use the slice), or ``None``.
        lung_key: key of a ``(1, Z, H, W)`` mask selecting slices, or ``None``.
        case_key: key of the case id in each volume. Default ``"case"``.
        class_key: key of the slice class in each sample. Default ``"slice_class"``.
        transform: callable applied to each sample dict.

    Raises:
        DataError: a volume's case has no entry in ``slice_classes`` or a class list of the wrong length.
        ValueError: a key is missing or not ``(C, Z, H, W)``, or no slice is selected.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        keys: Sequence[str] = ("image", "label"),
        slice_classes: Mapping[str, Sequence[int]] | None = None,
        lung_key: str | None = None,
        case_key: str = "case",
        class_key: str = "slice_class",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.volumes = volumes
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        if not self.keys:
            raise ValueError("keys must name at least one array to slice")
        self.case_key = case_key
        self.class_key = class_key
        self.transform = transform
        self.with_classes = slice_classes is not None
        self.index: list[tuple[int, int, int]] = []
        for v in range(len(volumes)):
            item = volumes[v]
            depth = self._depth(item, v)
            case = str(item.get(case_key, v))
            if slice_classes is not None:
                if case not in slice_classes:
                    raise DataError(case, "no slice classes for this study (was it in the pseudo-mask stage's list?)")
                classes = [int(c) for c in slice_classes[case]]
                if len(classes) != depth:
                    raise DataError(case, f"{len(classes)} slice classes for a volume of {depth} slices")
                self.index += [(v, z, c) for z, c in enumerate(classes) if c >= 0]
            elif lung_key is not None:
                lung = torch.as_tensor(_plain(item[lung_key]))
                present = lung.reshape(lung.shape[0], depth, -1).ne(0).any(dim=2).any(dim=0)
                self.index += [(v, int(z), -1) for z in torch.nonzero(present).flatten().tolist()]
            else:
                self.index += [(v, z, -1) for z in range(depth)]
        if not self.index:
            raise ValueError("no slice selected: the volumes are empty, hold no lung, or no slice has a class >= 0")

    def _depth(self, item: Mapping[str, Any], v: int) -> int:
        depths = set()
        for key in self.keys:
            if key not in item:
                raise ValueError(f"volume {v} has no {key!r} (keys: {sorted(map(str, item))})")
            if len(item[key].shape) != 4:
                raise ValueError(f"{key!r} of volume {v} must be (C, Z, H, W), got {tuple(item[key].shape)}")
            depths.add(int(item[key].shape[1]))
        if len(depths) != 1:
            raise ValueError(f"the keys {self.keys} of volume {v} have different numbers of slices: {sorted(depths)}")
        return depths.pop()

    @property
    def classes(self) -> np.ndarray:
        """Class of each sample, ``(len(self),)`` int64 (-1 everywhere without ``slice_classes``)."""
        return np.asarray([c for _, _, c in self.index], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, z, c = self.index[i]
        item = self.volumes[v]
        sample: dict[str, Any] = {key: _plain(item[key])[:, z].clone() for key in self.keys}
        sample["case"] = str(item.get(self.case_key, v))
        sample["slice"] = z
        if self.with_classes:
            sample[self.class_key] = torch.tensor(c, dtype=torch.int64)
        return self.transform(sample) if self.transform is not None else sample


class BalancedClassBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices holding ``batch_size // 2`` samples of class 1 and the rest of class 0.

    Each epoch (each ``iter``) both classes are reshuffled (``numpy.random.default_rng([seed, rank, epoch])``)
    and dealt out without repetition as long as they last; the smaller class is recycled when it has fewer
    samples than one batch needs. Every replica yields the same number of batches, ``len(self)``, so that
    distributed training (each rank taking the ``rank``-th share of every class) stays in step.

    Args:
        labels: class of each dataset index (1 = high, 0 = low; other values are ignored).
        batch_size: samples per batch, >= 2.
        seed: shuffling seed.
        num_replicas: number of distributed ranks. Default 1.
        rank: this rank. Default 0.
        num_batches: batches per epoch; default as many as the classes fill without repetition.

    Raises:
        ValueError: a class is empty (a contrastive batch needs both), or bad sizes.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 to hold both classes, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        lab = np.asarray(torch.as_tensor(np.asarray(labels)).reshape(-1), dtype=np.int64)
        high, low = np.flatnonzero(lab == 1), np.flatnonzero(lab == 0)
        if high.size == 0 or low.size == 0:
            raise ValueError(
                f"both classes are needed for contrastive batches, got {high.size} high and {low.size} low samples"
            )
        self.n_high, self.n_low = batch_size // 2, batch_size - batch_size // 2
        self.high, self.low = high[rank::num_replicas], low[rank::num_replicas]
        if self.high.size == 0 or self.low.size == 0:
            raise ValueError(f"rank {rank} of {num_replicas} gets no sample of one class: use fewer ranks")
        default = min(high.size // self.n_high, low.size // self.n_low) // num_replicas
        self.num_batches = max(1, default) if num_batches is None else int(num_batches)
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` at the next ``iter`` (otherwise each ``iter`` advances the epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch])
        self.epoch += 1
        high = np.resize(rng.permutation(self.high), self.num_batches * self.n_high)
        low = np.resize(rng.permutation(self.low), self.num_batches * self.n_low)
        for b in range(self.num_batches):
            batch = np.concatenate(
                [high[b * self.n_high : (b + 1) * self.n_high], low[b * self.n_low : (b + 1) * self.n_low]]
            )
            yield [int(i) for i in rng.permutation(batch)]
