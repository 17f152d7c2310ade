"""Deterministic synthetic phantoms written in the real public dataset layouts (synthetic data only, no real scans).

Generators return numpy arrays plus an affine, so tests and benchmarks can use them without files:
``brain.make_brain_case`` (BraTS-like 4-modality tumour MRI), ``chest_ct.make_chest_ct_case`` (MosMed-like
COVID-19 chest CT in HU) and ``mri_pet.make_mri_pet_case`` (ADNI-like T1 MRI + FDG-PET in MNI space).
``write.write_synthetic_dataset`` writes them as BraTS 2021/2023, MSD Task01, MosMedData or ADNI folders.
Import the modules by full path, e.g. ``from common.data.synthetic.write import write_synthetic_dataset``.
"""
