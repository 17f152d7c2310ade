"""Post-processing transform fusing an ensemble of sampled masks: consensus, mean and per-voxel uncertainty.

A diffusion segmentation model (MedSegDiff, Wu et al., MIDL 2023, arXiv 2211.00611) draws several masks per image
from different noise; the paper fuses 5 samples with STAPLE. :class:`FuseEnsembled` turns the stacked samples that
:class:`~common.engines.diffusion.DiffusionSegmentationInferer` writes under ``pred`` into the fused mask, the
ensemble mean (the fraction of samples marking each voxel) and the ensemble standard deviation (the uncertainty
map), using :mod:`common.metrics.ensemble` (STAPLE through ITK). MONAI's ``MeanEnsembled``/``VoteEnsembled`` take
one key per member and neither computes STAPLE nor a spread, hence this transform.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from common.metrics.ensemble import ensemble_mean, ensemble_uncertainty, staple

__all__ = ["FUSION_METHODS", "FuseEnsembled"]

#: Consensus rules: STAPLE (Warfield et al. 2004, ITK) or the mean thresholded at ``threshold`` (majority vote).
FUSION_METHODS = ("staple", "mean")


class FuseEnsembled(MapTransform):
    """Fuse ``N`` stacked binary samples: ``(N * C, *spatial) -> (C, *spatial)`` consensus, mean and uncertainty.

    Channel ``n * C + c`` of ``data[key]`` is sample ``n`` of mask channel ``c`` (sample-major, as
    :class:`~common.engines.diffusion.DiffusionSegmentationInferer` writes it). For each mask channel:

    - ``data[key]`` becomes the consensus ``(C, *spatial)``, 0/1: ``"staple"`` (default) runs binary STAPLE
      (:func:`~common.metrics.ensemble.staple`, ITK's ``STAPLEImageFilter``, over the whole volume, so each sample's
      sensitivity and specificity are estimated from all its voxels) and thresholds its foreground probability at
      ``threshold``; ``"mean"`` thresholds the ensemble mean at ``threshold`` (a majority vote). One sample is its own
      consensus.
    - ``data[key + mean_postfix]``: the ensemble mean ``(C, *spatial)`` in ``[0, 1]``.
    - ``data[key + uncertainty_postfix]``: the ensemble standard deviation ``(C, *spatial)``, 0 where all samples
      agree, at most 0.5 (:func:`~common.metrics.ensemble.ensemble_uncertainty`).

    Outputs keep the type, device and metadata of the input (a ``MetaTensor`` stays one, for ``Invertd``).

    Args:
        keys: keys of the stacked samples.
        num_samples: ensemble size ``N``; the channel count must be a multiple of it.
        method: ``"staple"`` or ``"mean"``.
        threshold: consensus threshold on the STAPLE probability or on the mean (default 0.5).
        mean_postfix: postfix of the mean's key; ``None`` to not write it.
        uncertainty_postfix: postfix of the uncertainty's key; ``None`` to not write it.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_samples: int,
        method: str = "staple",
        threshold: float = 0.5,
        mean_postfix: str | None = "_mean",
        uncertainty_postfix: str | None = "_uncertainty",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if method not in FUSION_METHODS:
            raise ValueError(f"method must be one of {FUSION_METHODS}, got {method!r}.")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}.")
        self.num_samples = int(num_samples)
        self.method = method
        self.threshold = float(threshold)
        self.mean_postfix = mean_postfix
        self.uncertainty_postfix = uncertainty_postfix

    def fuse(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(N, C, *spatial)`` 0/1 samples -> consensus, mean, standard deviation, each ``(C, *spatial)``."""
        mean = np.asarray(ensemble_mean(samples), dtype=np.float32)
        spread = np.asarray(ensemble_uncertainty(samples), dtype=np.float32)
        if samples.shape[0] == 1:
            consensus = samples[0] > 0
        elif self.method == "mean":
            consensus = mean > self.threshold
        else:
            consensus = np.stack([staple(samples[:, c], threshold=self.threshold)[0] for c in range(samples.shape[1])])
        return consensus.astype(np.float32), mean, spread

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            stacked = d[key]
            if stacked.ndim < 2 or stacked.shape[0] % self.num_samples:
                raise ValueError(
                    f"{key!r}: expected (N * C, *spatial) stacked samples, the channels a multiple of "
                    f"N = {self.num_samples}, got shape {tuple(stacked.shape)}."
                )
            array = stacked.detach().cpu().numpy() if isinstance(stacked, torch.Tensor) else np.asarray(stacked)
            if not np.isin(array, (0, 1)).all():
                raise ValueError(f"{key!r}: samples must be binary (0/1) masks.")
            channels = array.shape[0] // self.num_samples
            samples = array.reshape(self.num_samples, channels, *array.shape[1:]).astype(np.uint8)
            consensus, mean, spread = self.fuse(samples)
            d[key] = convert_to_dst_type(consensus, stacked, dtype=torch.float32)[0]
            if self.mean_postfix is not None:
                d[f"{key}{self.mean_postfix}"] = convert_to_dst_type(mean, stacked, dtype=torch.float32)[0]
            if self.uncertainty_postfix is not None:
                d[f"{key}{self.uncertainty_postfix}"] = convert_to_dst_type(spread, stacked, dtype=torch.float32)[0]
        return d
