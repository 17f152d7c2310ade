"""Missing-modality transforms: exactly the named channels are zeroed, at least one channel always survives."""

import numpy as np
import pytest
import torch

from common.data.modality_dropout import DropChannelsd, RandModalityDropoutd


def _image():
    return torch.arange(1, 4 * 8 + 1, dtype=torch.float32).reshape(4, 2, 2, 2)


def test_drop_channels_zeroes_only_those_channels():
    img = _image()
    out = DropChannelsd("image", channels=[1, 3])({"image": img})["image"]
    assert torch.all(out[[1, 3]] == 0) and torch.equal(out[[0, 2]], img[[0, 2]])
    assert torch.all(img[1] != 0)  # input untouched
    assert torch.equal(DropChannelsd("image", channels=None)({"image": img})["image"], img)
    with pytest.raises(ValueError, match=r"channels \[4\] out of range for 'image' with 4 channels"):
        DropChannelsd("image", channels=4)({"image": img})


def test_random_dropout_probability_and_bounds():
    t = RandModalityDropoutd("image", prob=1.0, max_dropped=2)
    t.set_random_state(0)
    counts = np.zeros(4)
    for _ in range(200):
        out = t({"image": _image()})["image"]
        dropped = [c for c in range(4) if torch.all(out[c] == 0)]
        assert 1 <= len(dropped) <= 2
        counts[dropped] += 1
    assert counts.min() > 20  # every modality gets dropped sometimes
    never = RandModalityDropoutd("image", prob=0.0)
    assert torch.equal(never({"image": _image()})["image"], _image())
    with pytest.raises(ValueError, match="must be smaller than the 4 channels"):
        RandModalityDropoutd("image", prob=1.0, max_dropped=4)({"image": _image()})
