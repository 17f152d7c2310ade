"""Synthetic paired T1 MRI and FDG-PET in MNI152 space (ADNI-like pairs for MRI-PET fusion).

Both images come from the same subject anatomy: the MNI152 template and tissue maps (:mod:`.brain`), warped by
a slight smooth random deformation. The MRI is the template with a per-subject intensity scale, a mild bias
field and Rician noise. The PET is a tissue uptake model (grey matter 2.5-4 times white matter, CSF near zero),
optionally with regional hypometabolism (a smooth blob of reduced grey-matter uptake, e.g. temporoparietal as in
Alzheimer's disease), blurred to PET resolution (Gaussian, 6-8 mm FWHM) with signal-dependent noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from common.data.synthetic.brain import (
    add_rician_noise,
    check_shape,
    mni152_on_grid,
    smooth_bias_field,
    smooth_random_field,
)

__all__ = ["HYPOMETABOLISM_REGIONS", "MNI152_FIELD_OF_VIEW_MM", "make_mri_pet_case", "mni152_affine"]

#: FSL's MNI152 1 mm grid (182 x 218 x 182), the usual target of ADNI registrations; smaller grids keep it.
MNI152_FIELD_OF_VIEW_MM = (182.0, 218.0, 182.0)
#: MNI coordinate (mm) of the centre of that grid.
_MNI152_GRID_CENTRE_MM = np.array([0.0, -18.0, 18.0])
#: Centres (MNI mm) of the hypometabolic blob(s) of each pattern.
HYPOMETABOLISM_REGIONS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "left temporoparietal": ((-50.0, -58.0, 28.0),),
    "right temporoparietal": ((50.0, -58.0, 28.0),),
    "bilateral temporoparietal": ((-50.0, -58.0, 28.0), (50.0, -58.0, 28.0)),
    "posterior cingulate": ((0.0, -52.0, 30.0),),
}


def mni152_affine(shape: Sequence[int]) -> np.ndarray:
    """MNI-space affine of ``shape``: FSL's ``diag(-s, s, s)``, ``s`` = 1 mm at 182 x 218 x 182.

    Smaller grids keep that field of view (isotropic ``s`` grows). The grid centre is MNI (0, -18, 18) mm, so
    world coordinates are MNI coordinates.
    """
    shape = check_shape(shape)
    spacing = max(fov / n for fov, n in zip(MNI152_FIELD_OF_VIEW_MM, shape))
    affine = np.diag([-spacing, spacing, spacing, 1.0])
    affine[:3, 3] = _MNI152_GRID_CENTRE_MM - affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    return affine


def make_mri_pet_case(
    shape: Sequence[int] = (128, 128, 128),
    rng: np.random.Generator | int | None = None,
    hypometabolism: bool = False,
) -> dict[str, np.ndarray]:
    """One synthetic subject: co-registered T1 MRI and FDG-PET on an MNI152 grid.

    The random draws do not depend on ``hypometabolism``: the same ``rng`` state with and without it gives the
    same subject, and the PETs differ only by the hypometabolic blob.

    Args:
        shape: grid (X, Y, Z), each >= 16; spacing isotropic, 1 mm at 182 x 218 x 182 (:func:`mni152_affine`).
        rng: a numpy ``Generator`` or a seed; the case is a deterministic function of it.
        hypometabolism: reduce grey-matter uptake by 20-45 % in a smooth blob (12-20 mm) at one of
            :data:`HYPOMETABOLISM_REGIONS`.

    Returns:
        dict with ``mri`` and ``pet``: float32 (X, Y, Z), >= 0 (MRI 0 outside the brain; PET in SUV-like units,
        grey matter 7-10); ``brain_mask``: uint8; ``gm``, ``wm``, ``csf``: float32 tissue fractions of the subject;
        ``hypometabolism``: float32 fractional uptake reduction map (all 0 without hypometabolism);
        ``affine``: 4x4; ``spacing``: (3,) mm; ``region``: 0-d str, the hypometabolism pattern or ``""``.
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(rng)
    affine = mni152_affine(shape)
    spacing = float(abs(affine[0, 0]))
    anatomy = mni152_on_grid(shape, affine)

    # subject anatomy: a slight smooth deformation of the template (1-2.5 mm), shared by MRI and PET
    amplitude = rng.uniform(1.0, 2.5) / spacing
    displacement = [amplitude * smooth_random_field(shape, rng, 35.0 / spacing) for _ in range(3)]
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    coords += np.stack(displacement)
    warped = {
        name: np.clip(ndimage.map_coordinates(anatomy[name], coords, order=1, mode="constant", cval=0.0), 0, None)
        for name in ("t1", "gm", "wm", "mask")
    }
    mask = np.clip(warped["mask"], 0, 1)
    gm, wm = warped["gm"], warped["wm"]
    csf = np.clip(mask - gm - wm, 0, 1)
    brain = mask > 0.5

    # MRI
    scale = rng.uniform(0.75, 1.3) * 1000.0
    mri = warped["t1"] * scale * smooth_bias_field(shape, rng, 0.05)
    mri = add_rician_noise(mri, rng.uniform(0.01, 0.03) * scale, rng)
    mri[~brain] = 0

    # PET: tissue uptake, optional hypometabolism, resolution blur, noise
    gm_uptake = rng.uniform(7.0, 10.0)
    wm_uptake = gm_uptake / rng.uniform(3.0, 4.0)
    csf_uptake = rng.uniform(0.0, 0.08) * wm_uptake
    names = sorted(HYPOMETABOLISM_REGIONS)
    region = names[int(rng.integers(len(names)))]
    depth = rng.uniform(0.2, 0.45)
    blob_sigma = rng.uniform(12.0, 20.0)
    jitter = rng.normal(0.0, 4.0, size=3)
    world = np.tensordot(affine[:3, :3], coords, axes=([1], [0])) + affine[:3, 3, None, None, None]
    reduction = np.zeros(shape, dtype=np.float32)
    if hypometabolism:
        for centre in HYPOMETABOLISM_REGIONS[region]:
            offset = world - (np.asarray(centre) + jitter)[:, None, None, None]
            blob = np.exp(-(offset**2).sum(axis=0) / (2 * blob_sigma**2))
            reduction = np.maximum(reduction, depth * blob).astype(np.float32)
    activity = gm * gm_uptake * (1 - reduction) + wm * wm_uptake + csf * csf_uptake
    fwhm = rng.uniform(6.0, 8.0)
    pet = ndimage.gaussian_filter(activity, fwhm / (2 * np.sqrt(2 * np.log(2))) / spacing)
    relative_noise = rng.uniform(0.03, 0.06)
    pet = pet + relative_noise * np.sqrt(np.clip(pet, 0, None) * gm_uptake) * rng.standard_normal(
        shape, dtype=np.float32
    )
    pet = np.clip(pet, 0, None).astype(np.float32)

    return {
        "mri": mri.astype(np.float32),
        "pet": pet,
        "brain_mask": brain.astype(np.uint8),
        "gm": gm.astype(np.float32),
        "wm": wm.astype(np.float32),
        "csf": csf.astype(np.float32),
        "hypometabolism": reduction,
        "affine": affine,
        "spacing": np.full(3, spacing),
        "region": np.asarray(region if hypometabolism else ""),
    }
