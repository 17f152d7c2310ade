"""Synthetic chest CT in Hounsfield units with COVID-19-like lesions (MosMedData-like studies).

The phantom is built in patient millimetres: an elliptic trunk (subcutaneous fat, chest wall with ribs),
mediastinum (heart, descending aorta, fat), a vertebra, two lungs (apical dome, diaphragm domes, the right
one higher, a cardiac notch on the left, denser dependent parenchyma) that fill their pleural cavities (the chest
wall, its ribs 2 mm outside the pleura, follows them round the apices and into the costophrenic corners), pulmonary vessels as a branching tree of
tapered tubes from each hilum, and airways (trachea, main and lobar bronchi) as air-filled tubes with soft-tissue
walls. Lesions of categories CT-1..CT-4 are ground-glass opacities (-700..-300 HU) with consolidated cores
(-100..+50 HU), multifocal, with a subpleural, posterior and basal preference. The scan is blurred slightly
(reconstruction kernel), gets correlated Gaussian noise, and is stored as int16 HU like real CT.

Two options make the phantom harder in the ways real CT is (both off by default, so that a seed gives the same
study as before; each draws from its own child of the case's random generator, so switching one on keeps the
anatomy of the study):

- ``pleural_lesions``: dense disease *against the chest wall*, the case a threshold lung mask cuts out. Lesioned
  studies gain one or two pleural-based masses (half-ellipsoids of -30..+50 HU centred on the costal pleura, 15-40
  mm along it) and, in two of three studies, a band of subpleural consolidation along the wall; these are lesions.
  Any study (healthy too) may get dense dependent atelectasis: a posterior basal band of collapsed lung (0..+40 HU)
  against the wall, inside the lungs but *not* a lesion (``atelectasis`` in the output).
- ``hu_overlap``: normal structures that take the HU of disease, so that no HU window separates the two, as in
  real scans: a stronger dependent (gravity) density gradient (to about -650 HU at the back of a supine patient),
  fainter ground glass (from -760 HU), a denser tree of finer vessels with the partial volume of thick slices
  (vessel occupancy blurred along z over the slice profile), motion blur next to the heart and at the lung bases
  (cardiac and respiratory motion smear vessels into GGO-like haze), and low-dose noise (35-70 HU instead of
  10-25 HU).

Orientation: ``affine = diag(-sx, -sy, sz)`` (DICOM LPS axes written as NIfTI RAS), so voxel index ``i`` runs
towards the patient's left and ``j`` towards the back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from common.data.synthetic.brain import check_shape, smooth_random_field

__all__ = [
    "CONSOLIDATION_FRACTION",
    "CT_CATEGORIES",
    "LESION_BURDEN",
    "chest_ct_spacing",
    "make_chest_ct_case",
]

CT_CATEGORIES = (0, 1, 2, 3, 4)
#: Lesion volume as a fraction of the lung volume per MosMed category (CT-1 < 25 %, CT-2 25-50 %,
#: CT-3 50-75 %, CT-4 > 75 % involvement); CT-0 is healthy.
LESION_BURDEN: dict[int, tuple[float, float]] = {1: (0.02, 0.2), 2: (0.25, 0.45), 3: (0.5, 0.7), 4: (0.75, 0.9)}
#: Fraction of the lesion volume that is consolidation (the rest is ground glass).
CONSOLIDATION_FRACTION: dict[int, tuple[float, float]] = {1: (0.05, 0.2), 2: (0.15, 0.3), 3: (0.25, 0.4), 4: (0.3, 0.5)}

_AIR, _FAT, _SOFT_TISSUE, _BLOOD = -1000.0, -100.0, 40.0, 40.0
_MIN_CHEST_HEIGHT_MM = 280.0


def chest_ct_spacing(shape: Sequence[int], rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Voxel spacing (mm) of a chest CT on ``shape``: in-plane 0.7-0.8 mm at 512 x 512, slices 5-8 mm.

    Smaller grids keep a chest-sized field of view: the in-plane spacing is scaled by ``512 / min(X, Y)`` and
    slices are thickened so that ``Z * sz >= 280 mm``.
    """
    x, y, z = check_shape(shape)
    rng = np.random.default_rng(rng)
    in_plane = rng.uniform(0.7, 0.8) * 512 / min(x, y)
    slice_thickness = max(rng.uniform(5.0, 8.0), _MIN_CHEST_HEIGHT_MM / z)
    return np.array([in_plane, in_plane, slice_thickness])


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


def _deflect(direction: np.ndarray, angle: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two child directions at +-``angle`` (radians) from ``direction`` in a random plane containing it."""
    normal = _unit(np.cross(direction, _unit(rng.standard_normal(3))))
    return (
        _unit(np.cos(angle) * direction + np.sin(angle) * normal),
        _unit(np.cos(angle) * direction - np.sin(angle) * normal),
    )


class _PatientGrid:
    """Voxel <-> patient-mm conversion for one grid (u: to the left, v: to the back, w: up; 0 at the centre)."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray) -> None:
        self.shape = shape
        self.spacing = spacing
        self.centre = (np.asarray(shape, dtype=float) - 1) / 2
        u, v, w = ((np.arange(n, dtype=np.float32) - c) * s for n, c, s in zip(shape, self.centre, spacing))
        self.u, self.v, self.w = u[:, None, None], v[None, :, None], w[None, None, :]

    def to_voxel(self, point_mm: np.ndarray) -> np.ndarray:
        return np.asarray(point_mm) / self.spacing + self.centre

    def inside(self, mask: np.ndarray, point_mm: np.ndarray) -> bool:
        index = np.round(self.to_voxel(point_mm)).astype(int)
        if np.any(index < 0) or np.any(index >= self.shape):
            return False
        return bool(mask[tuple(index)])


def _render_tubes(
    segments: list[tuple[np.ndarray, np.ndarray, float, float]], grid: _PatientGrid, extra_mm: float = 0.0
) -> np.ndarray:
    """Partial-volume occupancy (0..1) of tapered tubes ``(start_mm, end_mm, radius_start, radius_end)``."""
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    voxel = float(np.prod(grid.spacing) ** (1 / 3))
    for start, end, r0, r1 in segments:
        r0, r1 = r0 + extra_mm, r1 + extra_mm
        reach = max(r0, r1) + voxel
        lo = np.floor(grid.to_voxel(np.minimum(start, end) - reach)).astype(int)
        hi = np.ceil(grid.to_voxel(np.maximum(start, end) + reach)).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, grid.shape)
        if np.any(hi <= lo):
            continue
        u = grid.u[lo[0] : hi[0]] - start[0]
        v = grid.v[:, lo[1] : hi[1]] - start[1]
        w = grid.w[:, :, lo[2] : hi[2]] - start[2]
        axis = end - start
        length2 = max(float(axis @ axis), 1e-9)
        t = np.clip((u * axis[0] + v * axis[1] + w * axis[2]) / length2, 0, 1)
        distance = np.sqrt((u - t * axis[0]) ** 2 + (v - t * axis[1]) ** 2 + (w - t * axis[2]) ** 2)
        radius = r0 + t * (r1 - r0)
        # a tube thinner than a voxel only fills part of it
        filled = np.clip(0.5 + (radius - distance) / voxel, 0, 1) * np.minimum(1.0, 2 * radius / voxel)
        box = occupancy[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(box, filled, out=box)
    return occupancy


def _branching_tree(
    start: np.ndarray,
    directions: list[np.ndarray],
    radius: float,
    length: float,
    rng: np.random.Generator,
    keep: Callable[[np.ndarray, int], bool],
    min_radius: float,
    max_depth: int,
    targets: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Tapered tube segments of a bifurcating tree (vessels, bronchi).

    Each segment tapers by 0.68-0.82 and splits in two at 20-40 degrees. With ``targets`` (points of the organ,
    (N, 3) mm), each child bends towards the best-aligned of 16 random targets, so that the tree spreads
    through the organ instead of leaving it. Branches stop below ``min_radius``, after ``max_depth``
    generations, or when ``keep(end_point, generation)`` is False.
    """
    segments = []
    stack = [(start, d, radius, length, 0) for d in directions]
    while stack:
        origin, direction, r, seg_length, depth = stack.pop()
        r_end = r * rng.uniform(0.68, 0.82)
        end = origin + direction * seg_length
        if depth > 0 and not keep(end, depth):
            continue
        segments.append((origin, end, r, r_end))
        if depth + 1 >= max_depth or r_end < min_radius:
            continue
        for child in _deflect(direction, np.deg2rad(rng.uniform(20, 40)), rng):
            if targets is not None and len(targets):
                toward = targets[rng.integers(len(targets), size=16)] - end
                toward /= np.maximum(np.linalg.norm(toward, axis=1, keepdims=True), 1e-6)
                child = _unit(child + toward[np.argmax(toward @ child)])
            stack.append((end, child, r_end, max(seg_length * rng.uniform(0.75, 0.95), 3 * r_end), depth + 1))
    return segments


def _wall_lesion(
    grid: _PatientGrid,
    lung: np.ndarray,
    wall_distance: np.ndarray,
    ellipse_axes: tuple[float, float, float],
    mid_zone: np.ndarray,
    side: float,
    mediastinum_half: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A pleural-based mass: a half-ellipsoid centred on the costal pleura of one lung, ``-> (X, Y, Z)`` bool in lung.

    The centre is a lung voxel of ``mid_zone`` within 3 mm of the chest wall (``wall_distance``) and at least 25 mm
    lateral of the mediastinum; the axes are along the wall (15-40 mm), into the lung (12-30 mm) and along z (12-30 mm), so half of
    the ellipsoid is chest wall and the lung part is a lens that touches the wall over its whole width.
    """
    cavity_a, cavity_b, v0 = ellipse_axes
    candidates = np.argwhere(lung & (wall_distance < 3.0) & (side * grid.u > mediastinum_half + 25.0) & mid_zone)
    if not len(candidates):
        return np.zeros(grid.shape, dtype=bool)
    centre = (candidates[rng.integers(len(candidates))] - grid.centre) * grid.spacing
    inward = _unit(np.array([-centre[0] / cavity_a**2, -(centre[1] - v0) / cavity_b**2, 0.0]))
    along = np.array([-inward[1], inward[0], 0.0])
    r_along, r_in, r_z = rng.uniform(15.0, 40.0), rng.uniform(12.0, 30.0), rng.uniform(12.0, 30.0)
    du, dv, dw = grid.u - centre[0], grid.v - centre[1], grid.w - centre[2]
    inside = (
        ((du * inward[0] + dv * inward[1]) / r_in) ** 2
        + ((du * along[0] + dv * along[1]) / r_along) ** 2
        + (dw / r_z) ** 2
    ) <= 1
    return lung & inside


def make_chest_ct_case(
    shape: Sequence[int] = (128, 128, 32),
    rng: np.random.Generator | int | None = None,
    category: int = 0,
    pleural_lesions: bool = False,
    hu_overlap: bool = False,
) -> dict[str, np.ndarray]:
    """One synthetic chest CT in HU, healthy (``category=0``) or with COVID-19-like lesions (1..4).

    Lesions are the top ``burden`` fraction of lung voxels of a smooth random score that rises towards the
    pleura, the back and the lung bases, so they are multifocal and mostly subpleural; ``burden`` is drawn from
    :data:`LESION_BURDEN` for the category, and the highest-scoring part of them (:data:`CONSOLIDATION_FRACTION`)
    is consolidation. Vessels and bronchi stay visible through ground glass.

    Args:
        shape: grid (X, Y, Z), each >= 16 (slices along Z); spacing from :func:`chest_ct_spacing`.
        rng: a numpy ``Generator`` or a seed; the case is a deterministic function of it, ``category`` and the
            options.
        category: MosMed severity, 0 (healthy) to 4.
        pleural_lesions: add pleural-based masses, subpleural consolidation and dependent atelectasis (see the
            module docstring). Default False.
        hu_overlap: add the normal structures whose HU overlap those of disease (see the module docstring).
            Default False.

    Returns:
        dict with ``image``: int16 (X, Y, Z) HU (air -1000, fat ~-100, soft tissue ~+40, lung ~-850);
        ``lesion``: uint8 binary lesion mask (all zero for category 0), inside ``lung``; ``lung``: uint8 mask of
        both lungs (the anatomical lungs: lesions and atelectasis included, airways not); ``atelectasis``: uint8
        mask of the dependent atelectasis (not a lesion; all zero unless ``pleural_lesions``); ``pleural_lesion``:
        uint8 mask of the lesions against the chest wall (part of ``lesion``; all zero unless ``pleural_lesions``);
        ``affine``: 4x4;
        ``spacing``: (3,) mm; ``lesion_fraction``: 0-d float, lesion / lung volume.
    """
    shape = check_shape(shape)
    if isinstance(category, bool) or category not in CT_CATEGORIES:
        raise ValueError(f"category must be one of {CT_CATEGORIES}, got {category!r}")
    rng = np.random.default_rng(rng)
    # the options draw from children of the generator (spawning does not advance it): the anatomy stays the same
    pleural_rng, overlap_rng = rng.spawn(2)
    spacing = chest_ct_spacing(shape, rng)
    grid = _PatientGrid(shape, spacing)
    u, v, w = grid.u, grid.v, grid.w
    fov_xy = min(shape[0], shape[1]) * spacing[0]
    fov_z = shape[2] * spacing[2]

    # trunk
    half_width = rng.uniform(0.36, 0.44) * fov_xy
    half_depth = half_width * rng.uniform(0.6, 0.72)
    v0 = rng.uniform(-0.02, 0.03) * fov_xy
    fat = rng.uniform(6.0, 22.0)
    wall = rng.uniform(10.0, 16.0)

    def ellipse(a: float, b: float) -> np.ndarray:
        return (u / a) ** 2 + ((v - v0) / b) ** 2 <= 1

    body = ellipse(half_width, half_depth) & (v <= v0 + 0.93 * half_depth)
    body = np.broadcast_to(body, shape)
    muscle = np.broadcast_to(ellipse(half_width - fat, half_depth - fat), shape)
    cavity_a, cavity_b = half_width - fat - wall, half_depth - fat - wall
    cavity = np.broadcast_to(ellipse(cavity_a, cavity_b), shape)

    # spine, mediastinum, heart, aorta
    r_vertebra = rng.uniform(14.0, 20.0)
    v_vertebra = v0 + cavity_b - 0.3 * r_vertebra
    mediastinum_half = rng.uniform(12.0, 20.0)
    r_trachea = rng.uniform(7.0, 9.5)
    v_trachea = v_vertebra - r_vertebra - rng.uniform(10.0, 18.0) - r_trachea
    lung_height = min(rng.uniform(220.0, 270.0), 0.9 * fov_z)
    top = fov_z / 2 - rng.uniform(0.15, 0.5) * (fov_z - lung_height)
    base = top - lung_height
    heart_centre = np.array([0.2 * cavity_a, v0 - 0.2 * cavity_b, base + 0.3 * lung_height])
    heart_axes = np.array([0.45 * cavity_a, 0.55 * cavity_b, 0.24 * lung_height]) * rng.uniform(0.9, 1.1, size=3)
    heart = ((u - heart_centre[0]) / heart_axes[0]) ** 2 + ((v - heart_centre[1]) / heart_axes[1]) ** 2 + (
        (w - heart_centre[2]) / heart_axes[2]
    ) ** 2 <= 1
    r_aorta = rng.uniform(10.0, 13.0)
    aorta_2d = (u - (r_vertebra + 8.0)) ** 2 + (v - (v_vertebra - 0.8 * r_vertebra)) ** 2 <= r_aorta**2
    aorta = np.broadcast_to(aorta_2d & (w <= top - 10.0), shape)
    vertebra_distance = np.sqrt(u**2 + (v - v_vertebra) ** 2)
    vertebra = np.broadcast_to(vertebra_distance <= r_vertebra, shape)

    # lungs: the cavity beside the mediastinum, domed at the apex, above the diaphragm
    height = (w - base) / lung_height
    taper = np.sqrt(np.clip(1 - (np.clip(height - 0.4, 0, None) / 0.6) ** 2, 0, 1))
    lung = np.zeros(shape, dtype=bool)
    dome = rng.uniform(30.0, 50.0)
    right_lift = rng.uniform(10.0, 20.0)
    for side in (-1.0, 1.0):
        a = (cavity_a - mediastinum_half) / 2 * 1.05
        b = cavity_b * 1.05
        centre_u, centre_v = side * (mediastinum_half + a / 1.05), v0 + 0.05 * cavity_b
        radial = ((u - centre_u) / a) ** 2 + ((v - centre_v) / b) ** 2
        diaphragm = base + (right_lift if side < 0 else 0.0) + dome * (1 - np.clip(radial, 0, 1))
        lung |= (radial <= taper**2) & (w >= diaphragm) & (w <= top) & (side * u > mediastinum_half)
    lung &= cavity & ~heart & ~aorta & np.broadcast_to(vertebra_distance > r_vertebra + 6.0, shape)
    lung = ndimage.binary_opening(lung, np.ones((2, 2, 1), dtype=bool))

    image = np.full(shape, _AIR, dtype=np.float32)
    image[body] = _FAT
    image[muscle] = 45.0
    mediastinal_fat = smooth_random_field(shape, rng, np.array([15.0, 15.0, 15.0]) / spacing) > 0.6
    image[cavity] = np.where(mediastinal_fat[cavity], -90.0, 35.0)
    # the lungs fill their pleural cavities: the rest of the cavity beside the mediastinum (round the apices, the
    # costophrenic corners) is chest wall, and the abdomen lies under the diaphragm
    under_lung = lung.any(axis=2, keepdims=True)
    below_lungs = under_lung & (np.cumsum(lung, axis=2) == 0)
    mediastinal = np.broadcast_to((np.abs(u) <= mediastinum_half) | (vertebra_distance <= r_vertebra + 6.0), shape)
    interior = cavity & ~(under_lung & ~(lung | mediastinal | heart | aorta | below_lungs))
    image[cavity & ~interior] = 45.0
    image[heart] = _BLOOD
    image[aorta] = 42.0
    # ribs: bone 2 mm outside the pleura, up to 10 mm thick, on a sloped, periodic pattern
    wall_depth = ndimage.distance_transform_edt(~interior, sampling=(spacing[0], spacing[1], 1e4))
    ring = muscle & ~interior & (wall_depth >= 2.0) & (wall_depth <= 2.0 + min(wall, 10.0))
    rib_phase = (w + 0.25 * np.abs(u) + rng.uniform(0, 30.0)) / rng.uniform(28.0, 34.0)
    ribs = ring & (np.sin(2 * np.pi * rib_phase) > 0.45) & (w <= top + 10.0)
    image[ribs] = rng.uniform(350.0, 550.0)
    image[vertebra] = rng.uniform(200.0, 300.0)
    image[np.broadcast_to((vertebra_distance > r_vertebra - 2.0) & (vertebra_distance <= r_vertebra), shape)] = 650.0
    canal = u**2 + (v - v_vertebra - r_vertebra - 9.0) ** 2 <= 8.0**2
    image[np.broadcast_to(canal, shape) & body] = 20.0

    # lung parenchyma: denser in the dependent (posterior) part, mild texture
    posterior = np.clip((v - (v0 - cavity_b)) / (2 * cavity_b), 0, 1)
    parenchyma = -870.0 + 50.0 * posterior + 12.0 * smooth_random_field(shape, rng, 3.0)
    if hu_overlap:
        # gravity-dependent density of a supine patient, patchy: up to about -650 HU at the back
        patchy = 0.5 + 0.5 * np.tanh(smooth_random_field(shape, overlap_rng, 12.0 / spacing))
        parenchyma = parenchyma + 170.0 * posterior**3 * (0.6 + 0.8 * patchy)
        parenchyma = parenchyma + 12.0 * smooth_random_field(shape, overlap_rng, 2.0)
    image[lung] = np.broadcast_to(parenchyma, shape)[lung]

    # lesions
    lesion = np.zeros(shape, dtype=bool)
    # drawn for every category, so that one seed gives the same anatomy and noise with or without lesions
    burden = rng.uniform(*LESION_BURDEN[max(category, 1)])
    consolidation_fraction = rng.uniform(*CONSOLIDATION_FRACTION[max(category, 1)])
    pleural_distance = ndimage.distance_transform_edt(lung, sampling=spacing)
    score = (
        smooth_random_field(shape, rng, 25.0 / spacing)
        + 0.5 * smooth_random_field(shape, rng, 10.0 / spacing)
        + 1.5 * np.exp(-pleural_distance / rng.uniform(12.0, 20.0))
        + 0.4 * posterior
        + 0.3 * np.clip(1 - height, 0, 1)
    ).astype(np.float32)
    ggo_density = 0.5 + 0.5 * np.tanh(smooth_random_field(shape, rng, 8.0 / spacing))
    consolidation_density = 0.5 + 0.5 * np.tanh(smooth_random_field(shape, rng, 8.0 / spacing))
    if category:
        lung_scores = score[lung]
        count = max(1, int(round(burden * lung_scores.size)))
        threshold = np.partition(lung_scores, lung_scores.size - count)[lung_scores.size - count]
        lesion = lung & (score >= threshold)
        lesion_scores = score[lesion]
        n_cons = int(round(consolidation_fraction * lesion_scores.size))
        consolidation = np.zeros(shape, dtype=bool)
        if n_cons:
            cut = np.partition(lesion_scores, lesion_scores.size - n_cons)[lesion_scores.size - n_cons]
            consolidation = lesion & (score >= cut)
        # faint ground glass starts where dependent density ends
        ggo_hu = (-760.0 + 410.0 * ggo_density) if hu_overlap else (-680.0 + 330.0 * ggo_density)
        consolidation_hu = -90.0 + 120.0 * consolidation_density
        in_plane_sigma = (0.6, 0.6, 0.3)
        consolidation_weight = ndimage.gaussian_filter(consolidation.astype(np.float32), in_plane_sigma)
        lesion_hu = ggo_hu + (consolidation_hu - ggo_hu) * np.clip(1.3 * consolidation_weight, 0, 1)
        alpha = np.clip(1.3 * ndimage.gaussian_filter(lesion.astype(np.float32), in_plane_sigma), 0, 1) * lung
        image = (1 - alpha) * image + alpha * lesion_hu

    atelectasis = np.zeros(shape, dtype=bool)
    dense = np.zeros(shape, dtype=bool)
    if pleural_lesions:
        cavity_2d = ellipse(cavity_a, cavity_b)[:, :, 0]
        wall_distance = ndimage.distance_transform_edt(cavity_2d, sampling=spacing[:2])[:, :, None]
        irregular = smooth_random_field(shape, pleural_rng, 10.0 / spacing)
        # masses and bands sit on the costal pleura of the middle zones, off the apex and the diaphragm
        mid_zone = (height > 0.3) & (height < 0.8)
        if category:
            sides = pleural_rng.choice([-1.0, 1.0], size=int(pleural_rng.integers(1, 3)))
            for side in sides:
                dense |= _wall_lesion(
                    grid, lung, wall_distance, (cavity_a, cavity_b, v0), mid_zone, side, mediastinum_half, pleural_rng
                )
            if pleural_rng.random() < 2 / 3:
                # subpleural consolidation: a band 5-15 mm deep along a 60-120 degree arc of one lung's wall
                side = pleural_rng.choice([-1.0, 1.0])
                angle = np.arctan2(v - v0, side * u)
                centre, half_arc = pleural_rng.uniform(-np.pi / 2, np.pi / 2), np.deg2rad(pleural_rng.uniform(30, 60))
                z_centre, z_half = pleural_rng.uniform(base, top), pleural_rng.uniform(20.0, 50.0)
                z_centre = base + lung_height * (0.3 + 0.5 * (z_centre - base) / lung_height)
                depth = pleural_rng.uniform(5.0, 15.0)
                dense |= (
                    lung
                    & (side * u > 0)
                    & (np.abs(angle - centre) < half_arc)
                    & (np.abs(w - z_centre) < z_half)
                    & mid_zone
                    & (wall_distance < depth * (1 + 0.4 * irregular))
                )
            lesion |= dense
        if pleural_rng.random() < 0.6:
            # dependent atelectasis: collapsed lung at the back of the bases, against the wall; not a lesion
            depth = pleural_rng.uniform(8.0, 20.0)
            atelectasis = (
                lung & (v > v0 + 0.2 * cavity_b) & (height < 0.55) & (wall_distance < depth * (1 + 0.4 * irregular))
            ) & ~lesion
        dense_hu = 10.0 + 30.0 * np.tanh(smooth_random_field(shape, pleural_rng, 8.0 / spacing))
        alpha = np.clip(1.3 * ndimage.gaussian_filter((dense | atelectasis).astype(np.float32), (0.6, 0.6, 0.3)), 0, 1)
        alpha *= lung
        image = (1 - alpha) * image + alpha * dense_hu

    # pulmonary vessels: trees from each hilum, trunks aimed at random points of the lung
    min_radius = max(0.5, 0.25 * float(spacing[0])) * (0.6 if hu_overlap else 1.0)
    carina = np.array([0.0, v_trachea, base + rng.uniform(0.6, 0.7) * lung_height])
    lung_points = (np.argwhere(lung) - grid.centre) * spacing

    def keep(point: np.ndarray, depth: int) -> bool:
        # the first generations may still run through the hilum (mediastinum) before entering the lung
        return grid.inside(lung, point) or (depth <= 1 and grid.inside(cavity, point))

    vessels: list = []
    for side in (-1.0, 1.0):
        hilum = np.array([side * (mediastinum_half + rng.uniform(8.0, 15.0)), v_trachea + rng.uniform(0, 15.0), 0.0])
        hilum[2] = carina[2] - rng.uniform(5.0, 20.0)
        targets = lung_points[lung_points[:, 0] * side > 0]
        if not len(targets):
            continue
        trunks = [_unit(targets[i] - hilum) for i in rng.integers(len(targets), size=int(rng.integers(6, 9)))]
        vessels += _branching_tree(
            hilum,
            trunks,
            rng.uniform(3.5, 6.0),
            rng.uniform(20.0, 32.0),
            rng,
            keep=keep,
            min_radius=min_radius,
            max_depth=10 if hu_overlap else 8,
            targets=targets,
        )
    vessel_occupancy = _render_tubes(vessels, grid)
    if hu_overlap:
        # partial volume of a thick slice: each slice averages the vessels over its sensitivity profile
        vessel_occupancy = ndimage.gaussian_filter1d(vessel_occupancy, 0.5, axis=2)
    vessel_occupancy = vessel_occupancy * lung
    image = (1 - vessel_occupancy) * image + vessel_occupancy * _BLOOD

    # airways: trachea from the top of the field of view to the carina, main and lobar bronchi
    trachea = (np.array([0.0, v_trachea, fov_z / 2 + 10.0]), carina, r_trachea, r_trachea)
    airways = [trachea]
    for side, angle, main_length, main_scale in ((-1.0, 25.0, 25.0, 0.75), (1.0, 45.0, 45.0, 0.7)):
        direction = _unit(np.array([side * np.sin(np.deg2rad(angle)), 0.1, -np.cos(np.deg2rad(angle))]))
        main = carina + direction * main_length * rng.uniform(0.85, 1.15)
        airways.append((carina, main, main_scale * r_trachea, 0.85 * main_scale * r_trachea))
        airways += _branching_tree(
            main,
            [_unit(np.array([side * 0.9, -0.2, 0.5])), _unit(np.array([side * 0.3, 0.3, -0.95]))],
            0.6 * r_trachea,
            rng.uniform(15.0, 25.0),
            rng,
            keep=keep,
            min_radius=max(1.5, 0.5 * float(spacing[0])),
            max_depth=3,
            targets=lung_points[lung_points[:, 0] * side > 0],
        )
    wall_thickness = max(1.5, 0.5 * float(spacing[0]))
    airway_wall = _render_tubes(airways, grid, extra_mm=wall_thickness)
    image = (1 - airway_wall) * image + airway_wall * _SOFT_TISSUE
    lumen = _render_tubes(airways, grid)
    image = (1 - lumen) * image + lumen * _AIR
    lesion &= lumen < 0.5

    if hu_overlap:
        # cardiac motion next to the heart, respiratory motion at the bases: vessels smear into haze
        heart_distance = ndimage.distance_transform_edt(~heart, sampling=spacing)
        motion = np.clip(np.exp(-heart_distance / 20.0) + np.clip(1 - height / 0.3, 0, 1), 0, 1)
        blurred = ndimage.gaussian_filter(image, (2.5 / spacing[0], 2.5 / spacing[1], 0.4))
        image = (1 - motion) * image + motion * blurred

    # reconstruction blur and correlated noise
    image = ndimage.gaussian_filter(image, (0.5, 0.5, 0.25))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.7, 0.7, 0.0))
    noise_sd = rng.uniform(10.0, 25.0)
    if hu_overlap:  # low-dose protocol
        noise_sd = overlap_rng.uniform(35.0, 70.0)
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    image = np.clip(np.round(image + noise), -1024, 3071).astype(np.int16)

    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * grid.centre[0], spacing[1] * grid.centre[1], -spacing[2] * grid.centre[2]]
    lung_volume = int(lung.sum())
    return {
        "image": image,
        "lesion": lesion.astype(np.uint8),
        "lung": lung.astype(np.uint8),
        "atelectasis": atelectasis.astype(np.uint8),
        "pleural_lesion": (dense & lesion).astype(np.uint8),
        "affine": affine,
        "spacing": spacing,
        "lesion_fraction": np.asarray(lesion.sum() / max(lung_volume, 1)),
    }
