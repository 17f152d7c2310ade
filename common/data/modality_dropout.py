"""Missing-modality robustness for multi-channel inputs: random modality dropout in training, and a fixed
modality removal for evaluating what a model does when one sequence of a case is missing.

A dropped modality is filled with zeros *after* z-score normalisation, i.e. with the mean intensity the
network sees for that channel, so it carries no information but no outlier either. This goes beyond the
HLWA-UNet paper (an option, off by default): MONAI has no transform for it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform


def _zero_channels(img: Any, channels: Sequence[int]) -> Any:
    out = img.clone() if torch.is_tensor(img) else img.copy()
    for c in channels:
        out[c] = 0
    return out


class DropChannelsd(MapTransform):
    """Zero the given channels of ``keys`` (channel-first), e.g. ``channels=[1]`` removes T1 from T1c, T1, T2, FLAIR.

    ``channels`` may be ``None`` or empty (no-op), so an evaluate config can expose ``drop_modality: null``.
    """

    def __init__(self, keys: KeysCollection, channels: int | Sequence[int] | None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = (
            [] if channels is None else ([int(channels)] if isinstance(channels, int) else [int(c) for c in channels])
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            n = d[key].shape[0]
            bad = [c for c in self.channels if not -n <= c < n]
            if bad:
                raise ValueError(f"DropChannelsd: channels {bad} out of range for {key!r} with {n} channels")
            if self.channels:
                d[key] = _zero_channels(d[key], self.channels)
        return d


class RandModalityDropoutd(RandomizableTransform, MapTransform):
    """With probability ``prob``, zero between 1 and ``max_dropped`` randomly chosen channels of ``keys``.

    At least one channel always stays. Train-time only; ``prob=0`` (the bundles' default) disables it.

    Args:
        keys: image keys, channel-first ``(C, *spatial)``.
        prob: probability of dropping anything for a sample.
        max_dropped: most channels dropped at once (``< C``).
    """

    def __init__(
        self, keys: KeysCollection, prob: float = 0.0, max_dropped: int = 1, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if max_dropped < 1:
            raise ValueError(f"max_dropped must be >= 1, got {max_dropped}")
        self.max_dropped = max_dropped
        self._channels: list[int] = []

    def randomize(self, num_channels: int) -> None:
        super().randomize(None)
        if not self._do_transform:
            self._channels = []
            return
        if self.max_dropped >= num_channels:
            raise ValueError(f"max_dropped={self.max_dropped} must be smaller than the {num_channels} channels")
        k = int(self.R.randint(1, self.max_dropped + 1))
        self._channels = sorted(int(c) for c in self.R.choice(num_channels, size=k, replace=False))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        self.randomize(d[first].shape[0])
        if self._channels:
            for key in self.key_iterator(d):
                d[key] = _zero_channels(d[key], self._channels)
        return d
