"""Selecting MosMedData studies for the stages of the COVID-19 bundle: by category, and by reference mask.

MosMedData COVID19_1110 sorts its studies into severity categories ``CT-0`` (normal) to ``CT-4``; only 50 CT-1
studies have a manual lesion mask. The 3D GAN of Shabani et al. (Computers in Biology and Medicine 2022)
learns from the categories alone: CT-0 studies are its healthy (real) volumes, the others its COVID-19
inputs. The masks are reference data, used only to validate and evaluate (the datalist keeps them out of
``training``, see :func:`common.data.datalist.validate_datalist_no_leak`).

Items are those of :func:`common.data.decathlon.load_datalist` (``case``, ``image``, ``category`` and, for
masked studies, ``label``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import DataError

__all__ = ["HEALTHY_CATEGORIES", "by_category", "with_reference_masks"]

#: MosMed categories of normal lungs.
HEALTHY_CATEGORIES: tuple[str, ...] = ("CT-0",)


def by_category(
    items: Sequence[Mapping[str, Any]],
    healthy: bool,
    healthy_categories: Sequence[str] = HEALTHY_CATEGORIES,
    source: str | os.PathLike = "datalist",
) -> list[dict[str, Any]]:
    """The healthy studies (``healthy=True``) or the others (COVID-19, ``healthy=False``) of ``items``.

    Raises:
        DataError: naming ``source``, if an item has no ``category`` or the selection is empty (the GAN needs
            both healthy and COVID-19 studies in training).
    """
    wanted = {str(c) for c in healthy_categories}
    missing = [str(it.get("case")) for it in items if "category" not in it]
    if missing:
        raise DataError(source, f"items without 'category' (not a MosMed datalist?): {', '.join(missing[:5])}")
    out = [dict(it) for it in items if (str(it["category"]) in wanted) == healthy]
    if not out:
        kind = (
            f"healthy ({', '.join(sorted(wanted))})" if healthy else "COVID-19 (not " + ", ".join(sorted(wanted)) + ")"
        )
        raise DataError(source, f"no {kind} study among the {len(items)} given: the GAN needs both kinds")
    return out


def with_reference_masks(
    items: Sequence[Mapping[str, Any]], source: str | os.PathLike = "datalist", key: str = "label"
) -> list[dict[str, Any]]:
    """The items that have a reference mask (``key``), for validation and evaluation.

    Raises:
        DataError: naming ``source``, if no item has one (nothing to measure against).
    """
    out = [dict(it) for it in items if key in it]
    if not out:
        raise DataError(
            source,
            f"none of the {len(items)} studies has a reference mask ({key!r}): validation and evaluation need "
            "masked studies (MosMed's masks/ folder) in this list",
        )
    return out
