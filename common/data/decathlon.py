"""Reading the collection's Decathlon-style datalists from bundle configs.

Why not ``monai.data.load_decathlon_datalist``: it joins ``base_dir`` only onto ``image`` and ``label``, while
the collection's datalists also carry ``mri``/``pet`` paths (ADNI pairs) and dataset-level facts (layout,
label convention, MSD channel order) that the bundles' transforms need.
"""

from __future__ import annotations

import json
import os
from typing import Any

from common.data.layouts import find_layout, path_keys
from common.errors import DataError


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError as err:
        raise DataError(path, "datalist not found (write one with tools/prepare_datalist.py)") from err
    except json.JSONDecodeError as err:
        raise DataError(path, f"not a JSON datalist: {err}") from err
    if not isinstance(content, dict):
        raise DataError(path, "a datalist must be a JSON object with 'training'/'validation'/'testing' lists")
    return content


def load_datalist(path: str, list_key: str, base_dir: str) -> list[dict[str, Any]]:
    """Items of ``list_key`` with every path key of the layouts (``image``, ``label``, ``mri``, ``pet``, see
    :func:`common.data.layouts.path_keys`) joined onto ``base_dir``.

    ``image`` may be a list (one file per modality); each entry is joined. An absent list raises
    :class:`~common.errors.DataError`; an empty one is returned empty.
    """
    content = _read(path)
    if list_key not in content:
        raise DataError(path, f"datalist has no {list_key!r} list (keys: {sorted(content)})")
    items, keys = [], path_keys()
    for item in content[list_key]:
        item = dict(item)
        for key in keys:
            if key in item:
                value = item[key]
                item[key] = (
                    [os.path.join(base_dir, v) for v in value]
                    if isinstance(value, list)
                    else os.path.join(base_dir, value)
                )
        items.append(item)
    return items


def labelled_items(path: str, list_key: str, base_dir: str) -> list[dict[str, Any]]:
    """The items of ``list_key`` that have a ``label``, paths joined as by :func:`load_datalist`: what an
    evaluation can score (a MosMed ``testing`` list also holds studies without a mask)."""
    return [item for item in load_datalist(path, list_key, base_dir) if "label" in item]


def without_labels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``items`` without their ``label`` key: what an inference reads (it never needs the label)."""
    return [{k: v for k, v in item.items() if k != "label"} for item in items]


def datalist_info(path: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dataset-level facts a bundle needs: ``layout``, ``label_convention`` and ``channel_reorder``.

    ``channel_reorder`` is the index order that brings the image channels to the collection's T1c, T1, T2,
    FLAIR (the layout's ``channel_reorder``: ``None`` when they already are, as for the BraTS layouts). A datalist
    without ``label_convention`` gets its layout's, or else the layout name.

    Args:
        path: the datalist.
        default: returned when no file is at ``path`` (a config's ``default_dataset_info``, for MONAI Label, which
            trains and infers without a datalist); None: a missing datalist is an error.
    """
    if default is not None and not os.path.isfile(path):
        return default
    content = _read(path)
    layout = content.get("layout")
    spec = find_layout(layout)
    default = spec.label_convention if spec is not None and spec.label_convention is not None else layout
    convention = content.get("label_convention", default)
    reorder = list(spec.channel_reorder) if spec is not None and spec.channel_reorder is not None else None
    return {"layout": layout, "label_convention": convention, "channel_reorder": reorder}
