"""The dataset layouts of the collection, one definition (:class:`DatasetLayout`) per public dataset.

========================  ============================================  ==========================================
layout                    dataset                                       module
========================  ============================================  ==========================================
``brats2021``             BraTS 2021 (2018-2021)                        ``brats2021.py`` (BraTS family: ``brats.py``)
``brats2023``             BraTS 2023+ (GLI, MEN, MET, PED, SSA)         ``brats2023.py``
``msd_task01``            Medical Segmentation Decathlon Task01         ``msd_task01.py``
``mosmed``                MosMedData COVID19_1110 chest CT              ``mosmed.py``
``adni_pairs``            ADNI T1 MRI + FDG-PET in MNI152               ``adni_pairs.py``
========================  ============================================  ==========================================

Each module defines ``LAYOUT``: the scanner finding the cases of a folder, and the rules the integrity check,
the datalist builder, the loaders, the synthetic writer and the defect planter read. A new dataset is a new
module here defining its ``LAYOUT``, listed in :data:`BUILTIN` below (or, outside the repository,
``register_layout(DatasetLayout(...))`` before calling the tools' functions); nothing else changes.
"""

from __future__ import annotations

from common.data.layouts import adni_pairs, brats2021, brats2023, mosmed, msd_task01
from common.data.layouts.base import (
    ANY,
    DATASET,
    EVALUATION,
    HOUNSFIELD,
    NON_NEGATIVE,
    TEST,
    DatasetLayout,
    LayoutScan,
    Problem,
    find_layout,
    get_layout,
    layout_names,
    path_keys,
    register_layout,
    unregister_layout,
)

__all__ = [
    "ANY",
    "BUILTIN",
    "DATASET",
    "EVALUATION",
    "HOUNSFIELD",
    "LAYOUTS",
    "NON_NEGATIVE",
    "TEST",
    "DatasetLayout",
    "LayoutScan",
    "Problem",
    "find_layout",
    "get_layout",
    "layout_names",
    "path_keys",
    "register_layout",
    "unregister_layout",
]

#: The collection's layouts, registered in this order (the order of ``--layout`` help and error messages).
BUILTIN: tuple[DatasetLayout, ...] = tuple(
    register_layout(module.LAYOUT) for module in (brats2021, brats2023, msd_task01, mosmed, adni_pairs)
)

#: Names of the built-in layouts; :func:`layout_names` also lists those registered later.
LAYOUTS: tuple[str, ...] = tuple(layout.name for layout in BUILTIN)
