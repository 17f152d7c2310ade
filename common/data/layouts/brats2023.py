"""BraTS 2023 and later: ``DIR/BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

Any ``BraTS-<task>-N-N`` challenge prefix is accepted (GLI, MEN, MET, PED, SSA); the synthetic writer writes
gliomas (GLI). Labels 0/1/2/3 (``brats2023`` convention: 3 = enhancing tumour).
"""

from __future__ import annotations

from common.data.layouts.brats import BratsNaming, brats_layout

__all__ = ["LAYOUT"]

LAYOUT = brats_layout(
    BratsNaming(
        layout="brats2023",
        case_folder=r"BraTS-[A-Za-z]+-\d+-\d+",
        separator="-",
        suffixes={"t1c": "t1c", "t1": "t1n", "t2": "t2w", "flair": "t2f"},
        example="BraTS-GLI-XXXXX-XXX",
        synthetic_case="BraTS-GLI-{:05d}-000",
        label_convention="brats2023",
    )
)
