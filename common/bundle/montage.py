"""A small PNG per bundle showing an input, the reference and the bundle's output on one case.

The main job writes one for every bundle, so a user sees at a glance that the output overlays the input.
``configs/pipeline.json`` says what to show under ``"montage"``::

    {"images": [{"key": "image", "channel": 0, "title": "T1c"}], "label": "label",
     "output": "{case}_seg.nii.gz", "kind": "mask"}

``kind`` is ``"mask"`` (label maps drawn over the first image) or ``"image"`` (the output shown as an image).
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from common.io import atomic_path  # noqa: E402


def _volume(path: str, channel: int | None = None) -> np.ndarray:
    arr = np.asanyarray(nib.load(path).dataobj)
    if arr.ndim == 4:
        arr = arr[..., channel or 0]
    return np.asarray(arr, dtype=np.float32)


def _best_slice(volumes: list[np.ndarray]) -> int:
    """The axial slice with the most foreground in the first non-empty mask, else the middle one."""
    for vol in volumes:
        if vol is not None and np.any(vol > 0):
            return int(np.argmax((vol > 0).sum(axis=(0, 1))))
    return volumes[0].shape[2] // 2 if volumes else 0


def make_montage(
    spec: dict[str, Any], dataset_dir: str, datalist: str, output_dir: str, png: str, title: str = ""
) -> str:
    """Draw the first testing case: inputs, reference label (if any) and output; write ``png`` atomically."""
    with open(datalist) as f:
        item = json.load(f)["testing"][0]
    images = []
    for panel in spec.get("images", []):
        ref = item[panel["key"]]
        ref = ref[panel.get("file", 0)] if isinstance(ref, list) else ref
        images.append((panel.get("title", panel["key"]), _volume(os.path.join(dataset_dir, ref), panel.get("channel"))))
    label = None
    if spec.get("label") and spec["label"] in item:
        label = _volume(os.path.join(dataset_dir, item[spec["label"]]))
    output = _volume(os.path.join(output_dir, spec["output"].format(**item)))
    kind = spec.get("kind", "mask")
    z = _best_slice([label, output] if kind == "mask" else [images[0][1]])
    panels: list[tuple[str, np.ndarray, np.ndarray | None]] = [(t, v[:, :, z], None) for t, v in images]
    if kind == "mask":
        base = images[0][1][:, :, z]
        if label is not None:
            panels.append(("reference", base, label[:, :, z]))
        panels.append(("output", base, output[:, :, z]))
    else:
        panels.append(("output", output[:, :, z], None))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (name, img, mask) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.rot90(img), cmap="gray")
        if mask is not None:
            ax.imshow(np.rot90(np.ma.masked_where(mask <= 0, mask)), cmap="autumn", alpha=0.6, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title} - case {item.get('case', '?')}, axial slice {z}", fontsize=10)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return png
