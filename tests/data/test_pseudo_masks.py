"""Tests for common/data/pseudo_masks.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.pseudo_masks import (
    classes_by_case,
    healthy_category_key,
    pseudo_mask,
    residual_map,
    slice_burden,
    slice_classes,
    slice_classes_grid,
)

SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def volumes() -> dict[str, np.ndarray]:
    """A lung-masked healthy volume, the same with a bright lesion, and a noisy 'perfect' inpainting."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    lung = ((z - 3.5) / 4.5) ** 2 + ((y - 16) / 13) ** 2 + ((x - 16) / 13) ** 2 <= 1
    healthy = np.where(lung, 0.1 + 0.02 * rng.standard_normal(SHAPE), 0.0)
    healthy[lung & ((y - 10) ** 2 + (x - 20) ** 2 <= 2)] = 0.7  # a vessel: the brightest healthy structure
    lesion = lung & (((z - 4) / 2) ** 2 + ((y - 20) / 4) ** 2 + ((x - 12) / 4) ** 2 <= 1)
    covid = healthy.copy()
    covid[lesion] = 0.55 + 0.02 * rng.standard_normal(int(lesion.sum()))
    covid[~lung & (y < 3)] = 1.0  # bright outside the lung: must be ignored
    generated = np.where(lung, healthy + 0.01 * rng.standard_normal(SHAPE), 0.0)
    return {"lung": lung, "healthy": healthy, "covid": covid, "lesion": lesion, "generated": generated}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("threshold", [0.1, 0.0, "otsu"])
def test_identity_generator_gives_empty_mask(volumes, threshold):
    mask = pseudo_mask(volumes["covid"], volumes["covid"], volumes["lung"], threshold=threshold)
    assert mask.dtype == bool and mask.shape == SHAPE and not mask.any()


@pytest.mark.parametrize("threshold", [0.1, "otsu"])
def test_inserted_lesion_is_found(volumes, threshold):
    mask = pseudo_mask(volumes["covid"], volumes["generated"], volumes["lung"], threshold=threshold)
    assert dice(mask, volumes["lesion"]) > 0.9
    assert not mask[~volumes["lung"]].any()


def test_residual_map_is_positive_part_inside_lung(volumes):
    res = residual_map(torch.as_tensor(volumes["covid"]), volumes["generated"], volumes["lung"])
    assert res.dtype == np.float32 and res.min() >= 0 and res.max() <= 1
    assert np.all(res[~volumes["lung"]] == 0)
    # where the generator added density the residual is 0 (positive part only, not |input - G(input)|)
    added = volumes["healthy"].copy()
    added[volumes["lesion"]] = 0.55
    assert residual_map(volumes["healthy"], added, volumes["lung"])[volumes["lesion"]].max() == 0
    with pytest.raises(ValueError, match="same shape"):
        residual_map(volumes["covid"], volumes["covid"][:4], volumes["lung"])
    with pytest.raises(ValueError, match="empty"):
        residual_map(volumes["covid"], volumes["covid"], np.zeros(SHAPE, dtype=bool))
    with pytest.raises(ValueError, match="threshold"):
        pseudo_mask(volumes["covid"], volumes["covid"], volumes["lung"], threshold="mean")


def test_slice_burden_hand_values():
    lung = np.zeros((3, 2, 2), dtype=bool)
    lung[0] = True
    lung[1, 0] = True  # slice 2 has no lung
    mask = np.zeros_like(lung)
    mask[0, 0, 0] = True
    mask[1, 0, :] = True
    mask[2] = True  # outside the lung: ignored
    burden = slice_burden(mask, lung)
    np.testing.assert_allclose(burden[:2], [0.25, 1.0])
    assert np.isnan(burden[2])


def test_slice_classes_follow_quartiles_and_are_balanced():
    burden = np.arange(20, dtype=np.float64)[::-1].copy()  # q1 = 4.75, q3 = 14.25
    burden[3] = np.nan
    indices, labels = slice_classes(burden, seed=0)
    q1, q3 = np.nanpercentile(burden, [25, 75])
    assert indices.dtype == labels.dtype == np.int64 and np.all(np.diff(indices) > 0)
    assert np.all(burden[indices[labels == 1]] > q3)
    assert np.all((burden[indices[labels == 0]] >= q1) & (burden[indices[labels == 0]] <= q3))
    n_high = int(np.sum(burden > q3))
    assert (labels == 1).sum() == (labels == 0).sum() == n_high  # low subsampled to the high count
    again_i, again_l = slice_classes(burden, seed=0)
    np.testing.assert_array_equal(indices, again_i)
    np.testing.assert_array_equal(labels, again_l)
    picks = {tuple(slice_classes(burden, seed=s)[0]) for s in range(5)}
    assert len(picks) > 1  # the subsample depends on the seed
    all_i, all_l = slice_classes(burden, balance=False)
    assert (all_l == 0).sum() == np.sum((burden >= q1) & (burden <= q3))


def test_slice_classes_empty_when_one_class_is_empty():
    indices, labels = slice_classes(np.zeros(10))
    assert indices.size == labels.size == 0
    indices, _ = slice_classes(np.full(4, np.nan))
    assert indices.size == 0


def test_pseudo_maskd_replaces_the_generator_output_and_empties_healthy_studies(volumes):
    from monai.data import MetaTensor

    from common.data.pseudo_masks import PseudoMaskd, SliceBurdend

    data = {
        "image": torch.as_tensor(volumes["covid"][None], dtype=torch.float32),
        "lung": torch.as_tensor(volumes["lung"][None], dtype=torch.float32),
        "pred": MetaTensor(torch.as_tensor(volumes["generated"][None], dtype=torch.float32), meta={"tag": 1}),
        "category": "CT-1",
    }
    out = SliceBurdend("pred", lung_key="lung")(PseudoMaskd("pred", threshold=0.1)(data))
    mask = out["pred"]
    assert isinstance(mask, MetaTensor) and mask.meta["tag"] == 1 and mask.dtype == torch.float32
    expected = pseudo_mask(volumes["covid"], volumes["generated"], volumes["lung"], 0.1)
    np.testing.assert_array_equal(mask[0].numpy() > 0, expected)
    np.testing.assert_allclose(out["slice_burden"], slice_burden(expected, volumes["lung"]), equal_nan=True)
    healthy = PseudoMaskd("pred")({**data, "category": "CT-0"})
    assert not healthy["pred"].any()
    assert PseudoMaskd("pred", healthy_key=None)({**data, "category": "CT-0"})["pred"].any()
    with pytest.raises(ValueError, match=r"\(1, Z, Y, X\)"):
        PseudoMaskd("pred")({**data, "pred": data["pred"][0]})
    with pytest.raises(ValueError, match="otsu"):
        PseudoMaskd("pred", threshold="mean")


def test_slice_classes_file_round_trip_and_grid_check(tmp_path):
    from common.data.pseudo_masks import load_slice_classes, save_slice_classes
    from common.errors import DataError

    burdens = {"b": np.array([0.0, 0.4, np.nan, 0.1]), "a": np.array([0.05, 0.0, 0.3, 0.0])}
    path = tmp_path / "pm" / "slice_classes.json"
    written = save_slice_classes(path, burdens, grid=(4, 8, 8), seed=1)
    content = load_slice_classes(path, grid=[4, 8, 8])
    assert list(content["cases"]) == ["a", "b"] and content["grid"] == [4, 8, 8]
    assert content["cases"]["b"]["burden"][2] is None  # NaN written as null
    # the classes are slice_classes() of the burdens concatenated in case order
    indices, labels = slice_classes(np.concatenate([burdens["a"], burdens["b"]]), seed=1)
    flat = np.asarray(content["cases"]["a"]["class"] + content["cases"]["b"]["class"])
    np.testing.assert_array_equal(np.flatnonzero(flat >= 0), indices)
    np.testing.assert_array_equal(flat[indices], labels)
    assert written["num_high"] == written["num_low"] == int((labels == 1).sum())
    with pytest.raises(DataError, match="same roi_size"):
        load_slice_classes(path, grid=(8, 8, 8))
    with pytest.raises(DataError, match="run the pseudo-mask stage"):
        load_slice_classes(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="slice burdens for a grid"):
        save_slice_classes(path, {"a": np.zeros(3)}, grid=(4, 8, 8))
    # what the TransUNet configs take from the file: its grid and, per case, the class of each slice
    assert slice_classes_grid(content, [32, 128, 128]) == [4, 8, 8]
    assert classes_by_case(content) == {c: content["cases"][c]["class"] for c in ("a", "b")}
    assert len(classes_by_case(content)["b"]) == 4
    # without slice classes (MONAI Label: no pseudo-mask stage): the default grid, no classes
    assert slice_classes_grid(None, [32, 128, 128]) == [32, 128, 128]
    assert classes_by_case(None) is None


def test_healthy_category_key():
    assert healthy_category_key(True) == "category"
    assert healthy_category_key(True, "cat") == "cat"
    assert healthy_category_key(False) is None


def test_attach_pseudo_masks_names_missing_studies(tmp_path):
    from common.data.pseudo_masks import attach_pseudo_masks
    from common.errors import DataError

    (tmp_path / "s1_pseudo.nii.gz").write_bytes(b"")
    items = [{"case": "s1", "image": "a.nii.gz"}]
    assert attach_pseudo_masks(items, tmp_path) == [{**items[0], "label": str(tmp_path / "s1_pseudo.nii.gz")}]
    assert "label" not in items[0]  # the input is not modified
    with pytest.raises(DataError, match="no pseudo-mask for s2"):
        attach_pseudo_masks([*items, {"case": "s2", "image": "b.nii.gz"}], tmp_path)
    with pytest.raises(DataError, match="already has 'label'"):
        attach_pseudo_masks([{"case": "s1", "label": "masks/s1_mask.nii.gz"}], tmp_path)


def test_hu_window_rule_and_otsu_window():
    from common.data.pseudo_masks import hu_window_mask, otsu_lung_window

    hu = np.array([-900.0, -700.0, -400.0, 0.0, -500.0])
    lung = np.array([1, 1, 1, 1, 0], dtype=bool)
    np.testing.assert_array_equal(hu_window_mask(hu, lung, (-750.0, -100.0)), [False, True, True, False, False])
    with pytest.raises(ValueError, match="hi > lo"):
        hu_window_mask(hu, lung, (0.0, 0.0))
    rng = np.random.default_rng(0)
    # aerated lung near -850 HU and denser tissue near -300 HU: Otsu's threshold falls between the modes
    lungs = [np.concatenate([rng.normal(-850, 30, 5000), rng.normal(-300, 60, 800), [400.0] * 50]) for _ in range(2)]
    lo, hi = otsu_lung_window(lungs)
    assert -750 < lo < -400 and hi == 100.0
    with pytest.raises(ValueError, match="no lung voxels"):
        otsu_lung_window([])
