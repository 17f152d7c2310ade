"""Tests for common/metrics/segmentation.py: against independent implementations (medpy, DeepMind's surface-distance)
on anisotropic volumes, the BraTS 2023 lesion-wise scores by hand, the empty cases, and the spacing from the affine."""

from __future__ import annotations

import numpy as np
import pytest
import surface_distance
import torch
from medpy.metric import binary as medpy_binary
from monai.data import MetaTensor
from monai.metrics import DiceMetric
from scipy import ndimage

from common.metrics.segmentation import (
    BRATS_PENALTY_MM,
    METRIC_NAMES,
    SegmentationMetrics,
    dice,
    grid_spacing,
    hd95,
    lesion_wise,
    reference_lesions,
    surface_dice,
)

SPACING = (0.7, 0.7, 5.0)  # chest-CT-like: thin in-plane, thick slices


def ellipsoid(shape, centre, radii_mm, spacing=SPACING) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, spacing, radii_mm)) <= 1.0


def reference() -> np.ndarray:
    return ellipsoid((64, 64, 20), (30, 32, 10), (15.0, 12.0, 30.0))


def predictions() -> dict[str, np.ndarray]:
    ref = reference()
    split = ref.copy()
    split[:, 30:33, :] = False  # cut in two
    split |= ellipsoid(ref.shape, (52, 10, 4), (5.0, 5.0, 8.0))  # and a far-away extra blob
    return {
        "shifted": np.roll(ref, (3, -2, 1), axis=(0, 1, 2)),
        "dilated": ndimage.binary_dilation(ref, iterations=2),
        "eroded": ndimage.binary_erosion(ref, iterations=2),
        "split": split,
    }


def cube(shape, lo, size) -> np.ndarray:
    """A box at ``lo`` of edge ``size`` (an int, or one per axis) in a zero volume of ``shape``."""
    out = np.zeros(shape, bool)
    out[tuple(slice(a, a + n) for a, n in zip(lo, np.broadcast_to(size, len(lo))))] = True
    return out


def medpy_hd95_directed(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """The max of the two directed 95th percentiles, over medpy's (independent) directed surface distances.

    medpy's surfaces are MONAI's (mask minus its 6-neighbourhood erosion) and its distances exact Euclidean in mm;
    its own ``hd95`` pools both directions before the percentile, which is not MONAI's definition.
    """
    directed = getattr(medpy_binary, "__surface_distances")
    return max(
        np.percentile(directed(pred, ref, spacing, 1), 95),
        np.percentile(directed(ref, pred, spacing, 1), 95),
    )


@pytest.mark.parametrize("name", ["shifted", "dilated", "eroded", "split"])
def test_against_medpy_and_surface_distance(name):
    ref, pred = reference(), predictions()[name]
    assert dice(pred, ref) == pytest.approx(medpy_binary.dc(pred, ref), abs=1e-4)
    monai_dice = DiceMetric(include_background=True, ignore_empty=False)(
        torch.as_tensor(pred[None, None]), torch.as_tensor(ref[None, None])
    )  # what the evaluate configs use as their key metric
    assert float(monai_dice) == pytest.approx(medpy_binary.dc(pred, ref), abs=1e-4)
    assert hd95(pred, ref, SPACING) == pytest.approx(medpy_hd95_directed(pred, ref, SPACING), abs=0.01)
    distances = surface_distance.compute_surface_distances(ref, pred, SPACING)
    for tolerance in (1.0, 3.0, 5.0):
        expected = surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)
        assert surface_dice(pred, ref, SPACING, tolerance) == pytest.approx(expected, abs=1e-4)


def test_hd95_is_the_max_of_directed_percentiles_not_the_pooled_one():
    # on the split mask the definitions part: the check above would catch a pooled or voxel-unit HD95
    ref, pred = reference(), predictions()["split"]
    ours = hd95(pred, ref, SPACING)
    assert abs(ours - medpy_binary.hd95(pred, ref, SPACING)) > 1.0
    assert abs(ours - hd95(pred, ref, (1.0, 1.0, 1.0))) > 1.0


def test_spacing_follows_the_axes():
    ref = cube((50, 50, 12), (5, 5, 4), (40, 40, 4))  # a slab: its faces are most of its surface
    pred = np.roll(ref, 2, axis=2)  # two slices off: 10 mm at 5 mm slices
    assert hd95(pred, ref, SPACING) == pytest.approx(10.0, abs=0.01)
    assert hd95(pred, ref, (5.0, 0.7, 0.7)) == pytest.approx(1.4, abs=0.01)
    with pytest.raises(ValueError, match="spacing"):
        hd95(pred, ref, (0.7, 0.7))


def test_empty_masks_follow_brats():
    empty = np.zeros((8, 8, 4), bool)
    ref = cube(empty.shape, (1, 1, 0), (6, 6, 3))  # 265 mm^3: above BraTS's 50 mm^3, so scored lesion-wise
    assert (dice(empty, empty), hd95(empty, empty, SPACING), surface_dice(empty, empty, SPACING, 1.0)) == (1, 0, 1)
    for p, g in ((empty, ref), (ref, empty)):
        assert (dice(p, g), hd95(p, g, SPACING), surface_dice(p, g, SPACING, 1.0)) == (0, BRATS_PENALTY_MM, 0)
        assert lesion_wise(p, g, SPACING).dice == 0 and lesion_wise(p, g, SPACING).hd95_mm == BRATS_PENALTY_MM
    both = lesion_wise(empty, empty, SPACING)
    assert (both.dice, both.hd95_mm, both.tp, both.fn, both.fp) == (1.0, 0.0, 0, 0, 0)
    # the configs' key metric: MONAI's DiceMetric with ignore_empty=False scores the same
    dm = DiceMetric(include_background=True, ignore_empty=False)
    t = lambda a: torch.as_tensor(a[None, None])  # noqa: E731
    assert float(dm(t(empty), t(empty))) == 1.0 and float(dm(t(empty), t(ref))) == 0.0


def test_lesion_wise_by_hand_found_missed_false_positive():
    shape, sp = (40, 40, 20), (1.0, 1.0, 2.0)  # voxel 2 mm^3, a 4^3 cube is 128 mm^3 > 50
    found, missed, false_positive = cube(shape, (2, 2, 2), 4), cube(shape, (25, 25, 10), 4), cube(shape, (2, 30, 12), 3)
    ref, pred = found | missed, found | false_positive
    scores = lesion_wise(pred, ref, sp)
    assert (scores.tp, scores.fn, scores.fp) == (1, 1, 1)
    # found: Dice 1, HD95 0; missed and false positive: Dice 0, 374 mm each; over 2 lesions + 1 FP
    assert scores.dice == pytest.approx(1 / 3)
    assert scores.hd95_mm == pytest.approx(2 * BRATS_PENALTY_MM / 3)
    # half of the found lesion: its Dice is 2 * 32 / (64 + 32)
    half = found.copy()
    half[:, :, 4:6] = False
    assert lesion_wise(half | false_positive, ref, sp).dice == pytest.approx((2 / 3) / 3)
    # the volume-wise (legacy) scores of the same case
    assert dice(pred, ref) == pytest.approx(2 * 64 / (128 + 91))


def test_lesion_wise_found_lesion_distance_in_mm():
    shape, sp = (30, 30, 20), (1.0, 1.0, 2.0)
    ref = cube(shape, (5, 5, 5), 6)
    pred = np.roll(ref, 1, axis=2)  # one slice off
    scores = lesion_wise(pred, ref, sp)
    assert scores.dice == pytest.approx(2 * 180 / 432)  # 5 of 6 slices overlap
    assert scores.hd95_mm == pytest.approx(hd95(pred, ref, sp)) and scores.hd95_mm == pytest.approx(
        medpy_hd95_directed(pred, ref, sp), abs=0.01
    )


def test_reference_lesions_merge_within_the_dilation():
    shape = (40, 12, 12)
    a = cube(shape, (2, 3, 3), 5)
    near = a | cube(shape, (12, 3, 3), 5)  # 5 background voxels between them: merged by 3 dilations
    far = a | cube(shape, (20, 3, 3), 5)  # 13 between: two lesions
    assert reference_lesions(near, dilation=3)[1] == 1
    assert reference_lesions(near, dilation=0)[1] == 2
    labels, n = reference_lesions(far, dilation=3)
    assert n == 2 and set(np.unique(labels[far])) == {1, 2} and not labels[~far].any()
    # a merged lesion is one lesion: a prediction of only one part scores that part's share, not a missed lesion
    scores = lesion_wise(a, near, (1.0, 1.0, 1.0))
    assert (scores.tp, scores.fn, scores.fp) == (1, 0, 0) and scores.dice == pytest.approx(2 * 125 / 375)


def test_lesion_matching_by_dilation_and_volume_threshold():
    shape, sp = (30, 30, 30), (1.0, 1.0, 1.0)
    ref = cube(shape, (5, 5, 5), 5)
    beside = cube(shape, (12, 5, 5), 5)  # 2 voxels away: within 3 dilations, a match with Dice 0
    scores = lesion_wise(beside, ref, sp)
    assert (scores.tp, scores.fn, scores.fp, scores.dice) == (1, 0, 0, 0.0)
    assert scores.hd95_mm == pytest.approx(hd95(beside, ref, sp)) and scores.hd95_mm < 10
    tiny = cube(shape, (20, 20, 20), 3)  # 27 mm^3 <= 50: not scored, and what touches it is no false positive
    both = lesion_wise(ref | tiny, ref | tiny, sp)
    assert (both.tp, both.fn, both.fp, both.dice, both.hd95_mm) == (1, 0, 0, 1.0, 0.0)
    assert lesion_wise(ref, ref | tiny, sp).fn == 0
    assert lesion_wise(ref | tiny, ref | tiny, sp, min_lesion_volume_mm3=10.0).tp == 2


def test_metric_reads_spacing_from_the_affine_and_refuses_plain_tensors():
    ref = cube((20, 20, 10), (5, 5, 3), 6)
    pred = np.roll(ref, 1, axis=2)
    # the z axis of the array is world x at 3 mm (a permuted, flipped affine)
    affine = torch.tensor([[0, 0, -3.0, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1]])
    y = MetaTensor(torch.as_tensor(ref[None], dtype=torch.float32), affine=affine)
    y_pred = MetaTensor(torch.as_tensor(pred[None], dtype=torch.float32), affine=affine)
    np.testing.assert_allclose(grid_spacing(y, 3), (0.8, 0.8, 3.0))
    metric = SegmentationMetrics(nsd_tolerance_mm=2.0)
    metric([y_pred], [y])  # a list of (C, ...) items, as from_engine gives
    table = metric.get_buffer()
    assert table.shape == (1, 1, len(METRIC_NAMES))
    row = dict(zip(METRIC_NAMES, table[0, 0].tolist()))
    assert row["hd95_mm"] == pytest.approx(hd95(pred, ref, (0.8, 0.8, 3.0))) and row["hd95_mm"] == pytest.approx(3.0)
    assert row["nsd"] == pytest.approx(surface_dice(pred, ref, (0.8, 0.8, 3.0), 2.0))
    assert metric.aggregate()["hd95_mm"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="spacing is unknown"):
        SegmentationMetrics()(torch.as_tensor(pred[None, None]), torch.as_tensor(ref[None, None]))
    explicit = SegmentationMetrics()
    explicit(torch.as_tensor(pred[None, None]), torch.as_tensor(ref[None, None]), spacing=(0.8, 0.8, 3.0))
    assert float(explicit.get_buffer()[0, 0, 0]) == pytest.approx(3.0)


def test_per_region_tolerances():
    ref = cube((20, 20, 10), (5, 5, 3), 6)
    pred = np.roll(ref, 1, axis=0)
    two = torch.as_tensor(np.stack([pred, pred])[None], dtype=torch.float32)
    refs = torch.as_tensor(np.stack([ref, ref])[None], dtype=torch.float32)
    metric = SegmentationMetrics(nsd_tolerance_mm=[0.5, 1.5])
    metric(two, refs, spacing=(1.0, 1.0, 1.0))
    nsd = metric.get_buffer()[0, :, METRIC_NAMES.index("nsd")]
    assert nsd[0] < 1.0 and nsd[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 channels"):
        metric(torch.cat([two, two[:, :1]], 1), torch.cat([refs, refs[:, :1]], 1), spacing=(1.0, 1.0, 1.0))
