"""A PNG per bundle showing inputs, the reference and the bundle's output on one case, with a legend and its Dice.

The main job writes one for every bundle, so a user sees at a glance that the output overlays the input.
``configs/pipeline.json`` says what to show under ``"montage"``::

    {"images": [{"key": "image", "file": 0, "title": "T1c"}], "label": "label",
     "output": "{case}_seg.nii.gz", "kind": "mask",
     "legend": {"1": "necrotic core", "2": "edema", "4": "enhancing"},
     "regions": {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}}

``kind`` is ``"mask"`` (label maps drawn over the first image) or ``"image"`` (the output shown as an image).
For masks, ``legend`` names the label values (default ``"label <v>"`` for each value present) and ``regions``
the label sets whose Dice (reference against output, on this case) the title shows, with their mean (default: one
region, every non-zero label). Panels are upsampled for display (linear for images, nearest for label maps) to at
least :data:`MIN_PANEL_PIXELS` on their long side, so that anatomy reads on a small demo grid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from scipy import ndimage  # noqa: E402

from common.io import atomic_path  # noqa: E402

__all__ = ["LABEL_COLOURS", "MIN_PANEL_PIXELS", "case_dice", "make_montage"]

#: smallest long side of a displayed panel, in pixels (a 96-voxel slice is upsampled 4x)
MIN_PANEL_PIXELS = 384
#: overlay colours of the label values in increasing order (BraTS: 1 red, 2 green, 4 yellow)
LABEL_COLOURS = ("#e41a1c", "#4daf4a", "#ffd92f", "#377eb8", "#984ea3", "#ff7f00")


def _volume(path: str, channel: int | None = None) -> np.ndarray:
    arr = np.asanyarray(nib.load(path).dataobj)
    if arr.ndim == 4:
        arr = arr[..., channel or 0]
    return np.asarray(arr, dtype=np.float32)


def _best_slice(volumes: list[np.ndarray | None]) -> int:
    """The axial slice of the first non-empty mask showing the most of its labels, then the most foreground;
    else the middle slice."""
    for vol in volumes:
        if vol is not None and np.any(vol > 0):
            kinds = sum((vol == v).any(axis=(0, 1)).astype(int) for v in np.unique(vol) if v > 0)
            return int(np.lexsort(((vol > 0).sum(axis=(0, 1)), kinds))[-1])
    first = next((v for v in volumes if v is not None), None)
    return first.shape[2] // 2 if first is not None else 0


def case_dice(label: np.ndarray, output: np.ndarray, regions: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Dice of each region (a set of label values) between ``label`` and ``output`` on one case, plus ``mean``.

    A region empty in both volumes scores 1 (as MONAI's ``DiceMetric(ignore_empty=False)``).
    """
    out: dict[str, float] = {}
    for name, values in regions.items():
        ref, pred = np.isin(label, values), np.isin(output, values)
        total = ref.sum() + pred.sum()
        out[name] = 1.0 if total == 0 else float(2 * (ref & pred).sum() / total)
    out["mean"] = float(np.mean(list(out.values())))
    return out


def _upsample(slice_2d: np.ndarray, nearest: bool) -> np.ndarray:
    factor = int(np.ceil(MIN_PANEL_PIXELS / max(slice_2d.shape)))
    if factor <= 1:
        return slice_2d
    return ndimage.zoom(slice_2d, factor, order=0 if nearest else 1)


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
    heading = f"{title} - case {item.get('case', '?')}, axial slice {z}"
    handles, colours = [], {}
    if kind == "mask":
        base = images[0][1][:, :, z]
        if label is not None:
            panels.append(("reference", base, label[:, :, z]))
        panels.append(("output", base, output[:, :, z]))
        legend = {int(k): str(v) for k, v in spec.get("legend", {}).items()}
        present = {int(v) for vol in (label, output) if vol is not None for v in np.unique(vol) if v > 0}
        values = sorted(present | set(legend))
        colours = {v: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, v in enumerate(values)}
        handles = [Patch(color=colours[v], label=f"{v}: {legend.get(v, f'label {v}')}") for v in values]
        if label is not None:
            dice = case_dice(label, output, spec.get("regions", {"foreground": values}))
            shown = ", ".join(f"{k} {v:.2f}" for k, v in dice.items() if k != "mean")
            heading += f"\nDice on this case: {shown}" + (f" (mean {dice['mean']:.2f})" if len(dice) > 2 else "")
    else:
        panels.append(("output", output[:, :, z], None))
    panel_inches = 3.6
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_inches * len(panels), panel_inches + 1.1))
    for ax, (name, img, mask) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.rot90(_upsample(img, nearest=False)), cmap="gray", interpolation="nearest")
        if mask is not None:
            index = np.zeros(mask.shape, dtype=np.int16)  # label value -> colour index, 0 transparent
            for i, v in enumerate(colours, start=1):
                index[mask == v] = i
            cmap = ListedColormap(["none", *colours.values()])
            shown = np.rot90(_upsample(index, nearest=True))
            overlay = np.ma.masked_where(shown == 0, shown)
            ax.imshow(overlay, cmap=cmap, vmin=0, vmax=len(colours), alpha=0.55, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(heading, fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png
