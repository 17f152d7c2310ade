"""BraTS 2021 (also 2018-2020): ``DIR/BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``.

Labels 0/1/2/4 (``brats2021`` convention: 1 necrotic core, 2 edema, 4 enhancing tumour).
"""

from __future__ import annotations

from common.data.layouts.brats import BratsNaming, brats_layout

__all__ = ["LAYOUT"]

LAYOUT = brats_layout(
    BratsNaming(
        layout="brats2021",
        case_folder=r"BraTS2021_\d+",
        separator="_",
        suffixes={"t1c": "t1ce", "t1": "t1", "t2": "t2", "flair": "flair"},
        example="BraTS2021_XXXXX",
        synthetic_case="BraTS2021_{:05d}",
        label_convention="brats2021",
    )
)
