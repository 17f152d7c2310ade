"""Synthetic brain tumour MRI: four co-registered, skull-stripped modalities on real MNI152 anatomy.

The anatomy is the ICBM 2009a MNI152 template and its grey/white matter maps that nilearn ships inside its
wheel (no download); cerebrospinal fluid is the rest of the brain mask. Two phantoms (:data:`BRAIN_PHANTOMS`,
the ``phantom`` argument of :func:`make_brain_case`):

``"basic"`` (the default; the tiny CI data and the demo use it): one glioma-like tumour (necrotic core,
enhancing rim, edema spreading along white matter) is placed inside the brain, pushes the surrounding tissue
away (mass effect), and the four modalities are rendered from tissue fractions with per-modality contrasts, a
smooth multiplicative bias field and Rician noise:

- T1:    WM > GM > CSF (CSF dark); tumour hypointense.
- T1ce:  as T1, plus a bright enhancing rim around a dark necrotic core.
- T2:    CSF > GM > WM (CSF bright); edema and necrosis bright.
- FLAIR: T2-like with CSF suppressed (darker than WM); edema brightest.

Its tumours are large (whole tumour about 45-210 mL), with a closed rim, a sharp edema border and one
contrast per modality, and a network separates them almost perfectly (held-out Dice near 0.99): too easy to
rank methods.

``"realistic"`` (:func:`make_realistic_brain_case`) is harder, for benchmarks; see that function for what it
models and what it does not.

The module also holds the pieces shared by the other phantoms (:mod:`.chest_ct`, :mod:`.mri_pet`):
shape validation, smooth random fields, MNI152 resampling and Rician noise.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "BRAIN_PHANTOMS",
    "BRATS_FIELD_OF_VIEW_MM",
    "BRATS_MODALITIES",
    "ENHANCING",
    "EDEMA",
    "MIN_GRID_SIZE",
    "MNI152Anatomy",
    "NECROTIC_CORE",
    "TISSUE_CONTRAST",
    "add_rician_noise",
    "brats_affine",
    "brats_spacing",
    "check_phantom",
    "check_shape",
    "load_mni152_anatomy",
    "make_brain_case",
    "make_realistic_brain_case",
    "mni152_on_grid",
    "radial_mass_effect",
    "resample_to_grid",
    "smooth_bias_field",
    "smooth_random_field",
]

#: smallest accepted grid edge: below this the brain, a tumour with three nested classes, or a lung tree no
#: longer fit.
MIN_GRID_SIZE = 16
#: BraTS volumes are 240 x 240 x 155 voxels of 1 mm (SRI24 atlas space); smaller grids keep this field of view.
BRATS_FIELD_OF_VIEW_MM = (240.0, 240.0, 155.0)
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
#: BraTS 2018-2021 label values of the returned ``seg`` (0 = background and healthy tissue).
NECROTIC_CORE, EDEMA, ENHANCING = 1, 2, 4
#: the tumour phantoms of :func:`make_brain_case`: today's easy one (default) and the benchmark one.
BRAIN_PHANTOMS = ("basic", "realistic")

#: Mean signal of each tissue per modality, relative to white matter in T1 (jittered by +-6 % per case).
TISSUE_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"wm": 1.00, "gm": 0.62, "csf": 0.22, "edema": 0.48, "enhancing": 0.55, "necrosis": 0.28},
    "t1ce": {"wm": 1.00, "gm": 0.66, "csf": 0.20, "edema": 0.50, "enhancing": 1.55, "necrosis": 0.25},
    "t2": {"wm": 0.42, "gm": 0.62, "csf": 1.45, "edema": 1.10, "enhancing": 0.85, "necrosis": 1.30},
    "flair": {"wm": 0.55, "gm": 0.72, "csf": 0.12, "edema": 1.35, "enhancing": 0.95, "necrosis": 0.45},
}

_CUBE = np.ones((3, 3, 3), dtype=bool)


def check_shape(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int]:
    """Return ``shape`` as a tuple of three ints >= :data:`MIN_GRID_SIZE`, or raise ``ValueError`` naming ``name``."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
        raise ValueError(f"{name} must be 3 positive integers (x, y, z), got {shape!r}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < MIN_GRID_SIZE:
            raise ValueError(f"{name} must be 3 integers >= {MIN_GRID_SIZE} (x, y, z), got {tuple(shape)!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


@functools.lru_cache(maxsize=64)
def _upsampling_matrix(n_out: int, n_in: int, step: float) -> np.ndarray:
    """(n_out, n_in) cubic-spline interpolation weights from a coarse lattice with ``step`` fine voxels per node."""
    coords = (np.arange(n_out) + 0.5) / step + 0.5
    columns = [ndimage.map_coordinates(unit, [coords], order=3, mode="mirror") for unit in np.eye(n_in)]
    return np.stack(columns, axis=1).astype(np.float32)


def smooth_random_field(
    shape: Sequence[int], rng: np.random.Generator, correlation_voxels: float | Sequence[float]
) -> np.ndarray:
    """Zero-mean, unit-variance random field that varies smoothly over ``correlation_voxels`` voxels per axis.

    White noise on a coarse lattice (one node every ``correlation_voxels``) is interpolated with cubic splines,
    one axis at a time (separable, so a 240 x 240 x 155 field costs milliseconds).

    Args:
        shape: output grid, any number of dimensions.
        rng: the random generator (consumed deterministically).
        correlation_voxels: node spacing of the coarse lattice, a scalar or one value per axis (>= 1).

    Returns:
        float32 array of ``shape``.
    """
    shape = tuple(int(n) for n in shape)
    steps = np.broadcast_to(np.asarray(correlation_voxels, dtype=float), (len(shape),))
    steps = np.maximum(steps, 1.0)
    coarse_shape = tuple(int(np.ceil(n / step)) + 2 for n, step in zip(shape, steps))
    field = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, (n_out, n_in, step) in enumerate(zip(shape, coarse_shape, steps)):
        weights = _upsampling_matrix(n_out, n_in, round(float(step), 6))
        field = np.moveaxis(np.moveaxis(field, axis, -1) @ weights.T, -1, axis)
    # moments from every other voxel: the field is smooth, and this halves the cost on large grids
    sample = field[tuple(slice(None, None, 2) for _ in shape)]
    field -= sample.mean()
    std = sample.std()
    if std > 0:
        field /= std
    return field.astype(np.float32)


def smooth_bias_field(shape: Sequence[int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Multiplicative MRI bias field ``exp(strength * f)``, ``f`` smooth over ~40 % of the field of view."""
    return np.exp(strength * smooth_random_field(shape, rng, np.asarray(shape, dtype=float) * 0.4)).astype(np.float32)


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude-MRI noise: ``|image + sigma * (n1 + i n2)|`` with independent standard normals n1, n2."""
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary).astype(np.float32)


def _block_mean(volume: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Average non-overlapping blocks of ``factors`` voxels (anti-aliasing before coarse resampling)."""
    cropped = volume[tuple(slice(0, (n // f) * f) for n, f in zip(volume.shape, factors))]
    blocks = cropped.reshape([v for n, f in zip(cropped.shape, factors) for v in (n // f, f)])
    return blocks.mean(axis=(1, 3, 5))


def resample_to_grid(
    volume: np.ndarray,
    volume_affine: np.ndarray,
    voxel_to_world: np.ndarray,
    shape: Sequence[int],
    order: int = 1,
) -> np.ndarray:
    """Sample a 3D ``volume`` on another voxel grid of the same world space.

    When the target grid is coarser, the source is first block-averaged by the integer part of the spacing
    ratio, so small grids show partial volumes instead of aliasing. Outside the source the value is 0.

    Args:
        volume: (I, J, K) source array.
        volume_affine: 4x4 voxel-to-world matrix of ``volume``.
        voxel_to_world: 4x4 voxel-to-world matrix of the target grid.
        shape: target grid (X, Y, Z).
        order: spline order of the interpolation.

    Returns:
        float32 array of ``shape``.
    """
    source_to_target = np.linalg.inv(volume_affine) @ voxel_to_world
    # source voxels per target voxel along each source axis (grids here are axis-aligned, possibly flipped)
    ratios = np.abs(source_to_target[:3, :3]).max(axis=1)
    factors = [max(1, int(np.floor(r + 1e-6))) for r in ratios]
    if any(f > 1 for f in factors):
        volume = _block_mean(volume, factors)
        shrink = np.diag([*map(float, factors), 1.0])
        shrink[:3, 3] = [(f - 1) / 2.0 for f in factors]
        volume_affine = volume_affine @ shrink
        source_to_target = np.linalg.inv(volume_affine) @ voxel_to_world
    out = ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32),
        source_to_target[:3, :3],
        offset=source_to_target[:3, 3],
        output_shape=tuple(shape),
        order=order,
        mode="constant",
        cval=0.0,
    )
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MNI152Anatomy:
    """The MNI152 (ICBM 2009a, 1 mm) template shipped with nilearn: T1, tissue fractions and brain mask.

    Attributes:
        t1, gm, wm, csf, mask: float32 (197, 233, 189) read-only arrays; ``gm + wm + csf == mask`` in the brain.
        affine: 4x4 voxel-to-MNI-mm matrix.
        brain_min_mm, brain_max_mm: corners of the brain mask's bounding box in MNI mm.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    brain_min_mm: tuple[float, float, float]
    brain_max_mm: tuple[float, float, float]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=1)
def load_mni152_anatomy() -> MNI152Anatomy:
    """Load (once per process, ~1-2 s) the MNI152 template, GM/WM maps and brain mask from nilearn's wheel."""
    from nilearn import datasets  # imported here: nilearn takes ~1 s to import and only brain phantoms need it

    images = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
    }
    affine = np.asarray(images["t1"].affine, dtype=float)
    for name, image in images.items():
        if image.shape != images["t1"].shape or not np.allclose(image.affine, affine):
            raise RuntimeError(f"nilearn's MNI152 {name} map is not on the template grid; nilearn version mismatch?")
    mask = (np.asarray(images["mask"].dataobj) > 0).astype(np.float32)
    gm = np.clip(np.asarray(images["gm"].dataobj, dtype=np.float32), 0, 1) * mask
    wm = np.clip(np.asarray(images["wm"].dataobj, dtype=np.float32), 0, 1) * mask
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0, 1)
    t1 = np.clip(np.asarray(images["t1"].dataobj, dtype=np.float32), 0, None) * mask
    corners = np.argwhere(mask > 0)
    lo = affine[:3, :3] @ corners.min(axis=0) + affine[:3, 3]
    hi = affine[:3, :3] @ corners.max(axis=0) + affine[:3, 3]
    return MNI152Anatomy(
        t1=_read_only(t1),
        gm=_read_only(gm),
        wm=_read_only(wm),
        csf=_read_only(csf),
        mask=_read_only(mask),
        affine=_read_only(affine),
        brain_min_mm=tuple(float(v) for v in np.minimum(lo, hi)),
        brain_max_mm=tuple(float(v) for v in np.maximum(lo, hi)),
    )


@functools.lru_cache(maxsize=4)
def _mni152_on_grid(shape: tuple[int, int, int], matrix: tuple[float, ...]) -> dict[str, np.ndarray]:
    anatomy = load_mni152_anatomy()
    voxel_to_mni = np.asarray(matrix, dtype=float).reshape(4, 4)
    maps = {
        name: resample_to_grid(getattr(anatomy, name), anatomy.affine, voxel_to_mni, shape)
        for name in ("t1", "gm", "wm", "mask")
    }
    maps["mask"] = np.clip(maps["mask"], 0, 1)
    maps["csf"] = np.clip(maps["mask"] - maps["gm"] - maps["wm"], 0, 1)
    maps["depth"] = ndimage.distance_transform_edt(maps["mask"] > 0.5).astype(np.float32)
    return {name: _read_only(value) for name, value in maps.items()}


def mni152_on_grid(shape: Sequence[int], voxel_to_mni: np.ndarray) -> dict[str, np.ndarray]:
    """The MNI152 anatomy sampled on a grid (cached per grid: repeated cases reuse it).

    Args:
        shape: the grid (X, Y, Z).
        voxel_to_mni: 4x4 matrix mapping the grid's voxel indices to MNI millimetres.

    Returns:
        read-only float32 (X, Y, Z) arrays: ``t1`` (template intensity, 0..1), ``gm``, ``wm``, ``csf`` (tissue
        fractions), ``mask`` (brain fraction; the brain is ``mask > 0.5``) and ``depth`` (distance in voxels
        from the brain's boundary, 0 outside).
    """
    key = tuple(float(v) for v in np.round(np.asarray(voxel_to_mni, dtype=float), 6).ravel())
    return _mni152_on_grid(check_shape(shape), key)


def brats_spacing(shape: Sequence[int]) -> float:
    """Isotropic spacing (mm) keeping BraTS's 240 x 240 x 155 mm field of view: 1 mm at 240 x 240 x 155."""
    x, y, z = check_shape(shape)
    return float(max(BRATS_FIELD_OF_VIEW_MM[0] / x, BRATS_FIELD_OF_VIEW_MM[1] / y, BRATS_FIELD_OF_VIEW_MM[2] / z))


def brats_affine(shape: Sequence[int], spacing: float | None = None) -> np.ndarray:
    """The BraTS NIfTI affine: LPS-style ``diag(-s, -s, s)`` with the y origin at the far edge.

    At 1 mm and 240 x 240 x 155 this is BraTS's ``srow_x = [-1 0 0 0]``, ``srow_y = [0 -1 0 239]``,
    ``srow_z = [0 0 1 0]``. MSD Task01 volumes share the grid.
    """
    shape = check_shape(shape)
    s = brats_spacing(shape) if spacing is None else float(spacing)
    affine = np.diag([-s, -s, s, 1.0])
    affine[1, 3] = (shape[1] - 1) * s
    return affine


def _brats_voxel_to_mni(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Map the BraTS grid onto MNI mm: same axes as ``affine``, brain centred in x/y and near the top in z."""
    anatomy = load_mni152_anatomy()
    lo, hi = np.asarray(anatomy.brain_min_mm), np.asarray(anatomy.brain_max_mm)
    linear = affine[:3, :3]
    spacing = abs(linear[2, 2])
    anchor_voxel = (np.asarray(shape, dtype=float) - 1) / 2
    anchor_mni = (lo + hi) / 2
    height = shape[2] * spacing
    margin = 0.04 * height
    if height < (hi[2] - lo[2]) + 2 * margin:
        # like BraTS: the vertex stays in the field of view, the lower brainstem is cut
        anchor_voxel[2] = shape[2] - 1 - margin / spacing
        anchor_mni[2] = hi[2]
    voxel_to_mni = np.eye(4)
    voxel_to_mni[:3, :3] = linear
    voxel_to_mni[:3, 3] = anchor_mni - linear @ anchor_voxel
    return voxel_to_mni


def radial_mass_effect(
    volumes: Sequence[np.ndarray], centre: Sequence[float], sigma: float, amplitude: float
) -> list[np.ndarray]:
    """Push tissue radially away from ``centre`` (a tumour's mass effect), smoothly and without folding.

    ``out(x) = in(c + (x - c) * (1 - a * exp(-r^2 / (2 sigma^2))))`` with ``r = |x - c|`` in voxels. The map
    ``r -> r (1 - a exp(-r^2 / 2 sigma^2))`` is increasing for ``0 <= a < 1`` (no folding); tissue moves outward
    by at most ``~0.61 a sigma`` (at ``r = sigma``) and is unchanged beyond ``3 sigma`` (|shift| < 0.035 sigma).

    Args:
        volumes: (X, Y, Z) arrays on an isotropic grid, deformed alike.
        centre: the tumour centre in voxel coordinates.
        sigma: extent of the deformation in voxels (> 0).
        amplitude: ``a`` in [0, 1).

    Returns:
        deformed float32 copies, same shapes.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not 0 <= amplitude < 1:
        raise ValueError(f"amplitude must be in [0, 1) so that the deformation does not fold, got {amplitude}")
    shape = volumes[0].shape
    centre = np.asarray(centre, dtype=float)
    lo = np.maximum(np.floor(centre - 3 * sigma).astype(int), 0)
    hi = np.minimum(np.ceil(centre + 3 * sigma).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"))
    offset = grid - centre.astype(np.float32)[:, None, None, None]
    squared = (offset * offset).sum(axis=0)
    coords = centre.astype(np.float32)[:, None, None, None] + offset * (
        1 - amplitude * np.exp(-squared / (2 * sigma * sigma))
    )
    outputs = []
    for volume in volumes:
        out = np.array(volume, dtype=np.float32, copy=True)
        out[box] = ndimage.map_coordinates(volume, coords, order=1, mode="nearest")
        outputs.append(out)
    return outputs


def _tumour_centre(
    brain: np.ndarray, depth: np.ndarray, mni_z: np.ndarray, needed: float, rng: np.random.Generator
) -> np.ndarray | None:
    """A random voxel at least ``needed`` voxels deep in the brain, preferably supratentorial (MNI z > -5 mm)."""
    for candidates in (brain & (depth >= needed) & (mni_z[None, None, :] > -5), brain & (depth >= needed)):
        found = np.argwhere(candidates)
        if len(found):
            return found[rng.integers(len(found))] + rng.uniform(-0.3, 0.3, size=3)
    return None


def check_phantom(phantom: str) -> str:
    """Return ``phantom`` if it is one of :data:`BRAIN_PHANTOMS`, else raise ``ValueError`` listing them."""
    if phantom not in BRAIN_PHANTOMS:
        raise ValueError(f"phantom must be one of {', '.join(BRAIN_PHANTOMS)}; got {phantom!r}")
    return phantom


def _brain_grid(shape: tuple[int, int, int]):
    """Spacing, BraTS affine, voxel-to-MNI map, MNI152 maps, brain mask and MNI z per slice of a grid."""
    spacing = brats_spacing(shape)
    affine = brats_affine(shape, spacing)
    voxel_to_mni = _brats_voxel_to_mni(shape, affine)
    anatomy = mni152_on_grid(shape, voxel_to_mni)
    brain = anatomy["mask"] > 0.5
    mni_z = voxel_to_mni[2, 2] * np.arange(shape[2]) + voxel_to_mni[2, 3]
    return spacing, affine, anatomy, brain, mni_z


def make_brain_case(
    shape: Sequence[int] = (240, 240, 155), rng: np.random.Generator | int | None = None, phantom: str = "basic"
) -> dict[str, np.ndarray]:
    """One synthetic BraTS-like case: T1, T1ce, T2, FLAIR and a tumour segmentation on MNI152 anatomy.

    ``phantom="realistic"`` returns :func:`make_realistic_brain_case` instead; the rest of this docstring is the
    ``"basic"`` phantom (the default).

    The tumour has a necrotic core (radius 5-14 mm), an enhancing rim (3-7 mm) that completely encloses the
    core (every 26-neighbour of a necrotic voxel is necrotic or enhancing), and edema (8-24 mm beyond the rim,
    reaching further into white matter). Its position, size and lobulated shape are random per case; it pushes
    the surrounding anatomy away (:func:`radial_mass_effect`). On tiny grids the radii are kept >= 1-1.5 voxels
    so that all three classes exist. Intensities: tissue fractions times :data:`TISSUE_CONTRAST`, a random
    scanner scale, a smooth bias field (one per modality), Rician noise, and 0 outside the brain.

    Args:
        shape: grid (X, Y, Z), each >= 16; spacing is isotropic, 1 mm at the BraTS size 240 x 240 x 155 and
            scaled so that the BraTS field of view fits smaller grids (:func:`brats_spacing`).
        rng: a numpy ``Generator`` or a seed; the case is a deterministic function of it.

    Returns:
        dict with ``t1``, ``t1ce``, ``t2``, ``flair``: float32 (X, Y, Z), >= 0, 0 outside the brain;
        ``seg``: uint8 (X, Y, Z) in BraTS 2021 values (0 background/healthy, 1 necrotic core, 2 edema,
        4 enhancing); ``brain_mask``: uint8; ``gm``, ``wm``, ``csf``: float32 tissue fractions after the mass
        effect (healthy anatomy, also under the tumour); ``affine``: 4x4 BraTS affine (:func:`brats_affine`);
        ``spacing``: float64 (3,) in mm.
    """
    if check_phantom(phantom) == "realistic":
        return make_realistic_brain_case(shape, rng)
    shape = check_shape(shape)
    rng = np.random.default_rng(rng)
    spacing, affine, anatomy, brain, mni_z = _brain_grid(shape)

    # tumour geometry, in voxels; floors keep three nested classes on tiny grids
    r_necrosis = max(rng.uniform(5.0, 14.0) / spacing, 1.5)
    rim = max(rng.uniform(3.0, 7.0) / spacing, 1.2)
    edema_reach = max(rng.uniform(8.0, 24.0) / spacing, 1.5)
    core_lobulation = rng.uniform(0.15, 0.3)
    edema_lobulation = rng.uniform(0.2, 0.4)
    push = rng.uniform(0.25, 0.55)
    push_extent = rng.uniform(0.9, 1.3)
    centre = _tumour_centre(brain, anatomy["depth"], mni_z, (r_necrosis + rim) * (1 + core_lobulation) + 1.5, rng)
    while centre is None and (r_necrosis > 1.0 or rim > 1.0):  # small grid: shrink the tumour until it fits
        r_necrosis, rim = max(0.85 * r_necrosis, 1.0), max(0.85 * rim, 1.0)
        needed = (r_necrosis + rim) * (1 + core_lobulation) + 1.5
        centre = _tumour_centre(brain, anatomy["depth"], mni_z, needed, rng)
    if centre is None:
        centre = np.argwhere(anatomy["depth"] >= anatomy["depth"].max())[0].astype(float)
    r_core = r_necrosis + rim
    sigma = (r_core + 0.5 * edema_reach) * push_extent

    gm, wm, csf = radial_mass_effect([anatomy["gm"], anatomy["wm"], anatomy["csf"]], centre, sigma, push)

    half = int(np.ceil(max((r_core + 1.3 * edema_reach) * (1 + edema_lobulation) + 2, 3 * sigma))) + 1
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    grid = np.meshgrid(*[np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)], indexing="ij")
    radius = np.sqrt(sum(g * g for g in grid))
    core_shape = np.tanh(smooth_random_field(box_shape, rng, max(1.5, 0.7 * r_core)))
    edema_shape = np.tanh(smooth_random_field(box_shape, rng, max(2.0, 0.5 * (r_core + edema_reach))))
    texture = 1 + 0.08 * smooth_random_field(box_shape, rng, 2.0)

    core_radius = radius / (1 + core_lobulation * core_shape)
    necrosis = core_radius <= r_necrosis
    necrosis[tuple(np.clip(np.round(centre).astype(int) - lo, 0, np.asarray(box_shape) - 1))] = True
    enhancing = ((core_radius <= r_core) | ndimage.binary_dilation(necrosis, _CUBE)) & ~necrosis
    tumour_core = necrosis | enhancing
    # edema infiltrates along white matter: its reach grows with the local WM fraction
    edema_radius = radius / (1 + edema_lobulation * edema_shape)
    edema_region = edema_radius <= r_core + edema_reach * (0.5 + 0.8 * wm[box])
    edema = (edema_region | ndimage.binary_dilation(tumour_core, _CUBE)) & brain[box] & ~tumour_core

    seg = np.zeros(shape, dtype=np.uint8)
    seg_box = seg[box]
    seg_box[edema] = EDEMA
    seg_box[enhancing] = ENHANCING
    seg_box[necrosis] = NECROTIC_CORE
    brain_mask = brain | (seg > 0)

    # partial volumes at the class borders
    soft = {
        name: ndimage.gaussian_filter(region.astype(np.float32), 0.6)
        for name, region in (("necrosis", necrosis), ("enhancing", enhancing), ("edema", edema))
    }
    healthy_weight = np.clip(1 - soft["necrosis"] - soft["enhancing"] - soft["edema"], 0, 1)

    case: dict[str, np.ndarray] = {}
    for modality in BRATS_MODALITIES:
        contrast = {tissue: value * rng.uniform(0.94, 1.06) for tissue, value in TISSUE_CONTRAST[modality].items()}
        image = gm * contrast["gm"] + wm * contrast["wm"] + csf * contrast["csf"]
        healthy = image[box].copy()
        image[box] = (
            healthy * healthy_weight
            + soft["edema"] * (0.35 * healthy + 0.65 * contrast["edema"] * texture)
            + soft["enhancing"] * contrast["enhancing"] * texture
            + soft["necrosis"] * contrast["necrosis"] * texture
        )
        scale = rng.uniform(400.0, 1500.0)
        image *= scale * smooth_bias_field(shape, rng, 0.12)
        image = add_rician_noise(image, rng.uniform(0.015, 0.035) * scale, rng)
        image[~brain_mask] = 0
        case[modality] = image.astype(np.float32)

    case.update(
        seg=seg,
        brain_mask=brain_mask.astype(np.uint8),
        gm=gm,
        wm=wm,
        csf=csf,
        affine=affine,
        spacing=np.full(3, spacing),
    )
    return case


#: Signal of solid non-enhancing tumour per modality in the realistic phantom (same units as
#: :data:`TISSUE_CONTRAST`): T1 and T1c hypointense, T2 and FLAIR hyperintense, between edema and WM.
NON_ENHANCING_CONTRAST = {"t1": 0.55, "t1ce": 0.58, "t2": 1.00, "flair": 1.15}
#: whole-tumour volume range (mL) of the realistic phantom; sizes are drawn log-uniformly in it.
REALISTIC_TUMOUR_ML = (1.0, 100.0)
#: probabilities of 1, 2 and 3 separate lesions per case (multifocal tumours).
REALISTIC_LESION_COUNTS = ((1, 2, 3), (0.7, 0.2, 0.1))
_MIN_TUMOUR_VOXELS, _MIN_CORE_VOXELS = 27, 8
_FACES = ndimage.generate_binary_structure(3, 1)


def _level_for_count(field: np.ndarray, allowed: np.ndarray, count: float) -> float:
    """The level ``t`` such that ``field <= t`` holds on ``count`` voxels of ``allowed`` (at least one)."""
    values = field[allowed]
    k = int(np.clip(round(count), 1, values.size)) - 1
    return float(np.partition(values, k)[k])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _satellite_centre(
    brain: np.ndarray, depth: np.ndarray, mni_z: np.ndarray, primary: np.ndarray, reach: float, needed: float,
    rng: np.random.Generator,
) -> np.ndarray | None:  # fmt: skip
    """A centre near the primary lesion (``reach`` voxels or a little more away), else anywhere deep enough."""
    for _ in range(30):
        direction = rng.standard_normal(3)
        centre = primary + direction / np.linalg.norm(direction) * reach * rng.uniform(1.0, 1.8)
        index = tuple(np.round(centre).astype(int))
        if all(0 <= i < n for i, n in zip(index, brain.shape)) and brain[index] and depth[index] >= needed:
            return centre
    return _tumour_centre(brain, depth, mni_z, needed, rng)


def _realistic_lesion(
    box_offset: np.ndarray, wm: np.ndarray, in_brain: np.ndarray, wt_voxels: float, core_voxels: float,
    spacing: float, rng: np.random.Generator,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Geometry and tissue fractions of one lesion inside its box (all arrays have the box's shape).

    ``box_offset``: (3, *box) voxel offsets from the lesion centre; ``wm``, ``in_brain``: white matter fraction and
    brain mask in the box. Returns boolean labels ``wt``, ``core``, ``enhancing`` and float32 partial volumes
    ``f_enhancing``, ``f_necrosis``, ``f_solid`` (non-enhancing solid tumour; the three sum to the core fraction)
    and ``edema_signal`` (1 next to the core, fading outwards, ``edge`` at the labelled border).
    """
    box_shape = box_offset.shape[1:]
    r_core = (3 * core_voxels / (4 * np.pi)) ** (1 / 3)
    r_wt = (3 * wt_voxels / (4 * np.pi)) ** (1 / 3)
    # an ellipsoid of random orientation and axes (volume-preserving), then lobulated by smooth noise
    axes = np.exp(rng.uniform(-0.25, 0.25, 3))
    metric = (_random_rotation(rng).T / (axes / np.prod(axes) ** (1 / 3))[:, None]).astype(np.float32)
    radius = np.linalg.norm(np.einsum("ij,j...->i...", metric, box_offset), axis=0)
    lobes = np.tanh(smooth_random_field(box_shape, rng, max(1.5, 0.6 * r_core)))
    core_field = radius / (1 + rng.uniform(0.15, 0.45) * lobes)
    # edema reaches further along white matter (infiltration follows the fibre tracts)
    edema_noise = np.tanh(smooth_random_field(box_shape, rng, max(2.0, 0.5 * r_wt)))
    edema_field = radius / ((1 + rng.uniform(0.2, 0.4) * edema_noise) * (0.7 + 0.6 * wm))

    core_level = _level_for_count(core_field, in_brain, core_voxels)
    core = (core_field <= core_level) & in_brain
    ring = ndimage.binary_dilation(core, _FACES) & in_brain & ~core  # edema always surrounds the core
    outside = in_brain & ~core & ~ring
    extra, edema_level, wt = wt_voxels - core.sum() - ring.sum(), -np.inf, core | ring
    for _ in range(4):  # edema islands not connected to the core are dropped, and the level raised to make up
        if extra < 1 or not outside.any():
            break
        edema_level = _level_for_count(edema_field, outside, extra)
        components, _ = ndimage.label(core | ring | ((edema_field <= edema_level) & in_brain), _CUBE)
        wt = np.isin(components, np.unique(components[core]))
        if wt.sum() >= wt_voxels - 0.5:
            break
        extra += wt_voxels - wt.sum()

    # core partial volume and depth (voxels) below its surface; the rim is a shell of irregular thickness
    gradient = np.maximum(np.sqrt(sum(g * g for g in np.gradient(core_field))), 1e-3)
    depth = (core_level - core_field) / gradient
    f_core = np.clip(0.5 + depth, 0.0, 1.0)
    thickness = max(rng.uniform(1.5, 6.0) / spacing, 0.6)
    thickness = thickness * (1 + 0.45 * np.tanh(smooth_random_field(box_shape, rng, max(1.5, 0.5 * r_core))))
    f_inner = np.clip(0.5 + depth - thickness, 0.0, 1.0)
    shell = f_core - f_inner
    # incomplete rims: enhancement is missing over a random share of the surface (smooth angular patches)
    patches = smooth_random_field(box_shape, rng, max(2.0, 0.8 * r_core))
    missing = 0.0 if rng.uniform() < 0.4 else rng.uniform(0.15, 0.6)
    present = np.ones(box_shape, dtype=np.float32)
    if missing > 0 and (core & (depth < thickness)).any():
        cut = float(np.quantile(patches[core & (depth < thickness)], missing))
        present = np.clip(0.5 + (patches - cut) / 0.3, 0.0, 1.0)
    f_enhancing = shell * present
    # heterogeneous interior: cystic necrosis and solid non-enhancing tumour in smooth patches
    mixing = smooth_random_field(box_shape, rng, max(1.5, 0.4 * r_core))
    necrotic_share = rng.uniform(0.2, 0.95)
    cut = float(np.quantile(mixing[core], 1 - necrotic_share)) if core.any() else 0.0
    necrotic = np.clip(0.5 + (mixing - cut) / 0.5, 0.0, 1.0)
    f_necrosis = f_inner * necrotic
    f_solid = f_inner * (1 - necrotic) + shell * (1 - present)
    enhancing = core & (f_enhancing >= 0.5 * f_core)
    if core.any() and not enhancing.any():  # keep at least the most enhancing voxel
        enhancing.flat[np.argmax(np.where(core, f_enhancing, -1.0))] = True

    # edema signal: full at the core, ``edge`` at the labelled border (exponential in the relative position
    # across the edema shell), then fading on into normal tissue at the shell's mean rate
    edge = rng.uniform(0.15, 0.4)
    from_core = ndimage.distance_transform_edt(~core) if core.any() else np.ones(box_shape)
    to_border = ndimage.distance_transform_edt(wt)
    beyond = np.clip(ndimage.distance_transform_edt(~wt) - 0.5, 0, None)
    shell_width = float(np.mean((from_core + to_border)[wt & ~core])) if (wt & ~core).any() else 1.0
    inside = edge ** (np.clip(from_core - 0.5, 0, None) / np.maximum(from_core + to_border - 1.0, 1e-3))
    outside = edge * np.exp(-beyond * np.log(1 / edge) / shell_width)
    edema_signal = np.where(wt, np.clip(inside, edge, 1.0), outside) * (1 - f_core)
    return {
        "wt": wt,
        "core": core,
        "enhancing": enhancing,
        "f_enhancing": f_enhancing.astype(np.float32),
        "f_necrosis": f_necrosis.astype(np.float32),
        "f_solid": f_solid.astype(np.float32),
        "edema_signal": (edema_signal * in_brain).astype(np.float32),
    }


def make_realistic_brain_case(
    shape: Sequence[int] = (240, 240, 155), rng: np.random.Generator | int | None = None
) -> dict[str, np.ndarray]:
    """A harder BraTS-like case for benchmarks: varied, multifocal, ill-defined tumours from varied scanners.

    What it models, beyond the ``"basic"`` phantom of :func:`make_brain_case`:

    - **Sizes**: whole-tumour volume log-uniform in :data:`REALISTIC_TUMOUR_ML` (1-100 mL), split over 1-3
      lesions (:data:`REALISTIC_LESION_COUNTS`; satellites 10-40 % of the main lesion's volume, placed next to
      it when there is room). Volumes are met to the voxel by choosing the level of each lesion's shape field
      (only the brain's edge or an overlap of two lesions takes some away). The tumour core is 15-60 % of each
      lesion.
    - **Shapes**: randomly oriented ellipsoids (axes within about +-25 %) lobulated by smooth noise; edema
      reaches up to 1.9x further into white matter than into grey matter (spread along fibre tracts).
    - **Enhancing rim**: 1.5-6 mm thick (at least 0.6 voxel), varying by +-45 % around the lesion, and in 60 %
      of the lesions missing over 15-60 % of the surface (that part is non-enhancing tumour, label 1); small
      lesions whose rim is thicker than their radius are solid enhancing nodules.
    - **Heterogeneous core**: cystic necrosis (T1/T1c dark, T2 bright, FLAIR anywhere from dark to bright) and
      solid non-enhancing tumour (:data:`NON_ENHANCING_CONTRAST`) in smooth patches, with textures.
    - **Infiltrative edema**: its signal is full next to the core and falls exponentially outwards, to 15-40 %
      at the labelled border, then on into normal tissue at the same rate, so the border has no intensity
      step; edema only partly replaces the tissue (60-85 %), so GM/WM structure shows through it.
    - **Scanners**: each case is a new simulated scanner, per modality: gain (log-uniform 100-4000), tissue
      contrasts (+-12 % per tissue), a contrast curve ``signal ** gamma`` (gamma 0.75-1.35), enhancement strength
      (T1c rim 1.15-1.75x WM), a bias field (strength 0.04-0.3, one coil field shared by the modalities plus
      a per-sequence part, correlation 30-70 % of the field of view), Rician noise (1-6 % of the WM-scale
      signal) and through-plane blur (Gaussian sigma 0-1 voxel, thick-slice acquisitions resampled to the
      grid). The parameters are returned in ``scanner``.
    - **Partial volume**: each voxel's core, rim and interior fractions are computed from the signed distance
      to the level sets (a one-voxel ramp), so thin rims and small lesions are blurred into their
      neighbourhood; the label of a voxel is its dominant class (core where the core covers >= 50 %, enhancing
      where enhancement is >= half of that core), as an annotator would draw it.

    What it does not model: skull, scalp and extra-cerebral tissue (the data are skull-stripped, as BraTS);
    tumour biology or growth models, hemorrhage, calcification and susceptibility artefacts, vessels, motion or
    ghosting; registration errors between modalities; inter-rater label noise; non-glioma pathologies (e.g.
    metastases, meningiomas) beyond what multifocality resembles; ventricle compression other than the radial
    mass effect; anatomy other than the one MNI152 brain (no atrophy, age or paediatric shapes).

    On grids much coarser than 1 mm, floors of :data:`_MIN_TUMOUR_VOXELS` whole-tumour and
    :data:`_MIN_CORE_VOXELS` core voxels per lesion apply (on a 16^3 grid one voxel is 3.4 mL).

    Args:
        shape: grid (X, Y, Z), each >= 16, BraTS field of view (:func:`brats_spacing`).
        rng: a numpy ``Generator`` or a seed; the case is a deterministic function of it.

    Returns:
        the keys of :func:`make_brain_case` (every tumour label is present in ``seg`` except, for small solid
        lesions, possibly the necrotic core 1), plus ``edema_signal`` (float32 (X, Y, Z) in [0, 1], the share of
        the edema in each voxel's signal, also outside the label), ``scanner`` (dict: modality -> ``gain``, ``gamma``,
        ``bias_strength``, ``noise``, ``slice_blur``, ``enhancement``), ``num_lesions`` (int) and
        ``planned_tumour_ml`` (float, the drawn whole-tumour volume before floors and clipping).
    """
    shape = check_shape(shape)
    rng = np.random.default_rng(rng)
    spacing, affine, anatomy, brain, mni_z = _brain_grid(shape)
    voxel_ml = spacing**3 / 1000.0

    low, high = REALISTIC_TUMOUR_ML
    tumour_ml = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    counts, weights = REALISTIC_LESION_COUNTS
    num_lesions = int(rng.choice(counts, p=weights))
    shares = np.array([1.0, *rng.uniform(0.1, 0.4, num_lesions - 1)])
    wt_voxels = np.maximum(tumour_ml * shares / shares.sum() / voxel_ml, _MIN_TUMOUR_VOXELS)
    core_voxels = np.maximum(rng.uniform(0.15, 0.6, num_lesions) * wt_voxels, _MIN_CORE_VOXELS)
    r_wt = (3 * wt_voxels / (4 * np.pi)) ** (1 / 3)
    r_core = (3 * core_voxels / (4 * np.pi)) ** (1 / 3)

    centres: list[np.ndarray] = []
    for i in range(num_lesions):
        needed = 1.2 * r_core[i] + 1.0
        if i == 0:
            centre = _tumour_centre(brain, anatomy["depth"], mni_z, needed, rng)
        else:
            centre = _satellite_centre(brain, anatomy["depth"], mni_z, centres[0], r_wt[0] + r_wt[i], needed, rng)
        if centre is None:  # tiny grid: the deepest voxel
            centre = np.argwhere(anatomy["depth"] >= anatomy["depth"].max())[0].astype(float)
        centres.append(centre)
    push = rng.uniform(0.15, 0.5) * min(1.0, r_core[0] * spacing / 12.0)  # small tumours barely push
    sigma = 0.5 * (r_core[0] + r_wt[0]) * rng.uniform(0.9, 1.3)
    gm, wm, csf = radial_mass_effect([anatomy["gm"], anatomy["wm"], anatomy["csf"]], centres[0], sigma, push)

    labels = {name: np.zeros(shape, dtype=bool) for name in ("wt", "core", "enhancing")}
    fractions = {name: np.zeros(shape, dtype=np.float32) for name in ("f_enhancing", "f_necrosis", "f_solid")}
    fractions["edema_signal"] = np.zeros(shape, dtype=np.float32)
    for i, centre in enumerate(centres):
        half = int(np.ceil(3.5 * r_wt[i])) + 3
        lo = np.maximum(np.floor(centre).astype(int) - half, 0)
        hi = np.minimum(np.floor(centre).astype(int) + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        offset = np.stack(
            np.meshgrid(*[np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre)], indexing="ij")
        )
        lesion = _realistic_lesion(offset, wm[box], brain[box], wt_voxels[i], core_voxels[i], spacing, rng)
        for name in labels:
            labels[name][box] |= lesion[name]
        for name in fractions:
            fractions[name][box] = np.maximum(fractions[name][box], lesion[name])
    f_core = fractions["f_enhancing"] + fractions["f_necrosis"] + fractions["f_solid"]
    over = np.maximum(f_core, 1.0)  # where two lesions overlap, the maxima may sum above 1
    for name in ("f_enhancing", "f_necrosis", "f_solid"):
        fractions[name] /= over
    f_core = np.minimum(f_core, 1.0)
    edema_signal = np.where(brain, fractions["edema_signal"] * (1 - f_core), 0.0).astype(np.float32)

    seg = np.zeros(shape, dtype=np.uint8)
    seg[labels["wt"]] = EDEMA
    seg[labels["core"]] = NECROTIC_CORE
    seg[labels["enhancing"] & labels["core"]] = ENHANCING
    core = np.isin(seg, (NECROTIC_CORE, ENHANCING))
    seg[ndimage.binary_dilation(core, _FACES) & (seg == 0)] = EDEMA  # lesions merged: edema still surrounds the core
    brain_mask = brain | (seg > 0)

    # tumour tissue signals for this case (relative to WM in T1, like TISSUE_CONTRAST)
    enhancement = rng.uniform(1.15, 1.75)
    necrosis = {"t2": rng.uniform(1.1, 1.5), "flair": rng.uniform(0.3, 1.1)}
    edema_flair = rng.uniform(1.05, 1.5)
    infiltration = rng.uniform(0.6, 0.85)
    core_texture = 1 + 0.12 * smooth_random_field(shape, rng, 1.5)
    edema_texture = 1 + 0.08 * smooth_random_field(shape, rng, 2.0)
    coil = smooth_random_field(shape, rng, np.asarray(shape, dtype=float) * rng.uniform(0.3, 0.7))
    case: dict = {}
    scanner: dict[str, dict[str, float]] = {}
    for modality in BRATS_MODALITIES:
        c = {tissue: value * rng.uniform(0.88, 1.12) for tissue, value in TISSUE_CONTRAST[modality].items()}
        c["solid"] = NON_ENHANCING_CONTRAST[modality] * rng.uniform(0.88, 1.12)
        c["necrosis"] = necrosis.get(modality, c["necrosis"])
        if modality == "t1ce":
            c["enhancing"] = enhancement * c["wm"]
        if modality == "flair":
            c["edema"] = edema_flair
        healthy = gm * c["gm"] + wm * c["wm"] + csf * c["csf"]
        background = (
            healthy * (1 - infiltration * edema_signal) + infiltration * edema_signal * c["edema"] * edema_texture
        )
        tumour = fractions["f_enhancing"] * c["enhancing"] + fractions["f_necrosis"] * c["necrosis"]
        tumour += fractions["f_solid"] * c["solid"]
        image = background * (1 - f_core) + tumour * core_texture
        params = {
            "gain": float(np.exp(rng.uniform(np.log(100.0), np.log(4000.0)))),
            "gamma": rng.uniform(0.75, 1.35),
            "bias_strength": rng.uniform(0.04, 0.3),
            "noise": rng.uniform(0.01, 0.06),
            "slice_blur": rng.uniform(0.0, 1.0),
            "enhancement": enhancement if modality == "t1ce" else 1.0,
        }
        image = np.power(np.maximum(image, 0.0), params["gamma"])
        if params["slice_blur"] > 0.05:
            image = ndimage.gaussian_filter1d(image, params["slice_blur"], axis=2, mode="nearest")
        own = smooth_random_field(shape, rng, np.asarray(shape, dtype=float) * 0.4)
        bias = np.exp(params["bias_strength"] * (0.75 * coil + 0.25 * own) / np.hypot(0.75, 0.25))
        image = image * params["gain"] * bias
        image = add_rician_noise(image.astype(np.float32), params["noise"] * params["gain"], rng)
        image[~brain_mask] = 0
        case[modality] = image.astype(np.float32)
        scanner[modality] = {k: float(v) for k, v in params.items()}

    case.update(
        seg=seg,
        brain_mask=brain_mask.astype(np.uint8),
        gm=gm,
        wm=wm,
        csf=csf,
        affine=affine,
        spacing=np.full(3, spacing),
        edema_signal=edema_signal,
        scanner=scanner,
        num_lesions=num_lesions,
        planned_tumour_ml=tumour_ml,
    )
    return case
