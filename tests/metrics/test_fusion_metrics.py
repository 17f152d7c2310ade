"""Tests of common/metrics/fusion.py: fusion metrics and the ranking summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import normalized_mutual_information as sk_nmi
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.metrics import fusion as fm
from common.networks.fusion_baselines import average_fusion, maximum_fusion


def _smooth(seed: int, shape: tuple[int, ...], sigma: float = 1.5) -> np.ndarray:
    """A fixed smooth random image scaled to [0, 1]."""
    x = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return (x - x.min()) / (x.max() - x.min())


@pytest.fixture(scope="module")
def pair_2d() -> tuple[np.ndarray, np.ndarray]:
    a = _smooth(0, (48, 40))
    b = np.clip(a + 0.05 * np.random.default_rng(1).standard_normal(a.shape), 0, 1)
    return a, b


@pytest.fixture(scope="module")
def mri_pet() -> tuple[np.ndarray, np.ndarray]:
    """A fixed non-cubic MRI-like / PET-like pair in [0, 1]."""
    mri = _smooth(2, (20, 24, 16), sigma=1.0)
    pet = _smooth(3, (20, 24, 16), sigma=3.0)
    return mri, pet


def test_psnr_matches_skimage(pair_2d):
    a, b = pair_2d
    assert fm.psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-10)
    assert fm.psnr(a, a) == math.inf


@pytest.mark.parametrize("three_d", [False, True])
def test_ssim_matches_skimage_gaussian_ssim(pair_2d, mri_pet, three_d):
    a, b = (mri_pet[0], np.clip(mri_pet[0] + 0.1 * mri_pet[1], 0, 1)) if three_d else pair_2d
    expected = structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert fm.ssim(b, a) == pytest.approx(expected, abs=1e-4)  # MONAI computes in float32
    assert fm.ssim(a, a) == pytest.approx(1.0, abs=1e-6)


def test_nmi_matches_skimage(pair_2d, mri_pet):
    a, b = pair_2d
    assert fm.normalized_mutual_information(b, a) == pytest.approx(sk_nmi(b, a), abs=1e-12)
    mri, pet = mri_pet
    assert fm.normalized_mutual_information(pet, mri, bins=32) == pytest.approx(sk_nmi(pet, mri, bins=32), abs=1e-12)
    assert fm.normalized_mutual_information(a, a) == pytest.approx(2.0)


def test_entropy_of_a_two_value_image_is_one_bit():
    image = np.zeros((6, 8))
    image[:, :4] = 1.0
    assert fm.entropy(image) == pytest.approx(1.0)
    assert fm.entropy(np.full((5, 5), 0.3)) == 0.0


def test_mutual_information_of_an_image_with_itself_is_its_entropy(pair_2d):
    a, b = pair_2d
    assert fm.mutual_information(a, a) == pytest.approx(fm.entropy(a), abs=1e-12)
    assert 0.0 < fm.mutual_information(b, a) < fm.entropy(a)
    independent = np.random.default_rng(7).random(a.shape)
    assert fm.mutual_information(independent, a, bins=16) < 0.3 * fm.mutual_information(b, a, bins=16)


def test_qabf_high_for_a_faithful_copy_and_low_for_noise(pair_2d):
    a, _ = pair_2d
    flat = np.full_like(a, 0.5)
    copy_score = fm.qabf(a, a, flat)
    assert copy_score > 0.95
    assert fm.qabf(np.random.default_rng(3).random(a.shape), a, flat) < 0.3
    assert fm.qabf(0.5 * (a + flat), a, flat) < copy_score  # halved edges lose strength preservation


def test_qabf_3d_averages_the_slices_with_edges(mri_pet):
    mri, pet = mri_pet
    fused = 0.5 * (mri + pet)
    per_slice = [fm.qabf(fused[..., k], mri[..., k], pet[..., k]) for k in range(mri.shape[-1])]
    assert fm.qabf(fused, mri, pet, axis=-1) == pytest.approx(np.mean(per_slice), rel=1e-12)
    padded = [np.concatenate([x, np.zeros((*x.shape[:2], 2))], axis=-1) for x in (fused, mri, pet)]
    assert fm.qabf(*padded) == pytest.approx(np.mean(per_slice), rel=1e-12)  # edge-free slices are skipped


def test_orientation_wrap_only_matters_for_near_vertical_edges():
    rows = np.arange(16, dtype=float)[:, None] * np.ones((1, 16))
    a = rows / 15.0  # gradient along axis 0 only: orientation +-pi/2, on the wrap-around
    f = a - 1e-3 * np.arange(16)[None, :] / 15.0  # the same edge, tilted a hair past vertical: arctan flips sign
    flat = np.zeros_like(a)
    assert fm.qabf(f, a, flat) > 0.95
    assert fm.qabf(f, a, flat, wrap_orientation=False) < 0.5


def test_fsim_is_one_for_identical_images_and_falls_with_blur(pair_2d):
    a, _ = pair_2d
    assert fm.fsim(a, a) == pytest.approx(1.0, abs=1e-12)
    scores = [fm.fsim(ndimage.gaussian_filter(a, s), a) for s in (0.7, 1.5, 3.0)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_phase_congruency_marks_edges_and_ignores_distant_flat_regions():
    bar = np.zeros((64, 64))
    bar[:, 24:40] = 1.0  # edges at columns 23|24 and 39|40; the FFT wraps, so keep the bar away from the border
    pc = fm.phase_congruency(bar)
    assert pc.shape == (64, 64)
    assert 0.0 <= pc.min() and pc.max() <= 1.0
    assert pc[:, [23, 24, 39, 40]].mean() > 0.5
    assert pc[:, 6:16].max() < 0.1 and pc[:, 48:58].max() < 0.1
    stacked = fm.phase_congruency(np.stack([bar, bar.T]))  # a stack of slices is processed slice by slice
    np.testing.assert_allclose(stacked[0], pc, atol=1e-12)
    np.testing.assert_allclose(stacked[1], pc.T, atol=1e-6)  # the filter bank is symmetric under transposition


def test_take_slice_and_slice_protocol(mri_pet):
    mri, pet = mri_pet
    fused = average_fusion(mri, pet)
    sliced = fm.fusion_metrics(fused, mri, pet, slice_index=8, axis=-1)
    assert sliced["psnr_mri"] == pytest.approx(fm.psnr(fused[..., 8], mri[..., 8]))
    assert sliced["ssim_pet"] == pytest.approx(fm.ssim(fused[..., 8], pet[..., 8]))
    assert sliced["fsim_mri"] == pytest.approx(fm.fsim(fused[..., 8], mri[..., 8]))
    np.testing.assert_array_equal(fm.take_slice(mri, 3, axis=0), mri[3])
    with pytest.raises(ValueError, match="outside"):
        fm.take_slice(mri, 16, axis=-1)


def test_fusion_metrics_volume_keys_means_and_psnr_min(mri_pet):
    mri, pet = mri_pet
    result = fm.fusion_metrics(torch.from_numpy(average_fusion(mri, pet))[None, None], mri, pet)
    for name in ("psnr", "ssim", "nmi", "mi", "fsim"):
        assert result[name] == pytest.approx(0.5 * (result[f"{name}_mri"] + result[f"{name}_pet"]))
    assert result["psnr_min"] == min(result["psnr_mri"], result["psnr_pet"])
    assert result["ssim_mri"] == pytest.approx(fm.ssim(0.5 * (mri + pet), mri))  # 3D SSIM on the volume
    assert {"qabf", "entropy", "entropy_mri", "entropy_pet"} <= set(result)


def test_copying_the_mri_has_lower_psnr_min_than_averaging(mri_pet):
    mri, pet = mri_pet
    copy = fm.fusion_metrics(mri.copy(), mri, pet, slice_index=8)
    average = fm.fusion_metrics(average_fusion(mri, pet), mri, pet, slice_index=8)
    assert copy["psnr_mri"] == math.inf
    assert copy["psnr_min"] < average["psnr_min"]


def test_metrics_reject_mismatched_or_batched_inputs(mri_pet):
    mri, pet = mri_pet
    with pytest.raises(ValueError, match="same shape"):
        fm.psnr(mri, pet[:-1])
    with pytest.raises(ValueError, match="one 2D or 3D image"):
        fm.fusion_metrics(np.stack([mri, mri]), np.stack([mri, mri]), np.stack([pet, pet]))


def test_scorer_reuses_the_sources_and_equals_fusion_metrics(mri_pet):
    mri, pet = mri_pet
    scorer = fm.FusionScorer(mri, pet, slice_index=5, axis=0)
    for fused in (average_fusion(mri, pet), maximum_fusion(mri, pet)):
        assert scorer(fused) == pytest.approx(fm.fusion_metrics(fused, mri, pet, slice_index=5, axis=0), rel=1e-12)
    with pytest.raises(ValueError, match="sources' shape"):
        scorer(mri[:-1])


def test_rank_methods_ranks_each_metric_and_orders_by_mean_rank():
    scores = {
        "a": {"ssim": 0.9, "qabf": 0.5, "psnr_min": 20.0},
        "b": {"ssim": 0.8, "qabf": 0.7, "psnr_min": 20.0},
        "c": {"ssim": 0.7, "qabf": math.nan, "psnr_min": 10.0},
    }
    ranks = fm.rank_methods(scores)
    assert list(ranks) == ["a", "b", "c"]
    assert ranks["a"] == {"rank_ssim": 1, "rank_qabf": 2, "rank_psnr_min": 1, "mean_rank": 4 / 3, "position": 1}
    assert ranks["b"]["rank_psnr_min"] == 1  # ties share the better rank
    assert ranks["c"]["rank_qabf"] == 3  # NaN ranks last
    assert ranks["c"]["position"] == 3
    with pytest.raises(ValueError, match="lack ranking metrics"):
        fm.rank_methods({"a": {"ssim": 1.0}})


def test_copying_the_mri_ranks_below_averaging_on_the_ranking_summary(mri_pet):
    mri, pet = mri_pet
    scorer = fm.FusionScorer(mri, pet)
    scores = {"copy_mri": scorer(mri.copy()), "average": scorer(average_fusion(mri, pet))}
    ranks = fm.rank_methods(scores)
    assert ranks["average"]["mean_rank"] < ranks["copy_mri"]["mean_rank"]
    assert scores["copy_mri"]["psnr"] == math.inf  # what averaged PSNR would have rewarded


def test_qabf_matches_a_hand_computed_value_on_a_step_edge():
    a = np.zeros((6, 6))
    a[:, 3:] = 1.0  # vertical step: Sobel s_x = 4 on columns 2 and 3, s_y = 0, orientation 0
    fused = 0.5 * a  # same orientation, half the strength: G^{AF} = 0.5, A^{AF} = 1
    flat = np.zeros_like(a)  # no edges: zero weight
    q_g = 0.9994 / (1 + math.exp(-15 * (0.5 - 0.5)))
    q_a = 0.9879 / (1 + math.exp(-22 * (1.0 - 0.8)))
    assert fm.qabf(fused, a, flat) == pytest.approx(q_g * q_a, rel=1e-12)


def test_fsim_against_a_flat_image_follows_its_formula(pair_2d):
    a, _ = pair_2d
    flat = np.full_like(a, 0.5)
    scaled = a * 255.0
    pc = fm.phase_congruency(scaled)
    scharr = np.array([[3.0, 0.0, -3.0], [10.0, 0.0, -10.0], [3.0, 0.0, -3.0]]) / 16.0
    g = np.hypot(ndimage.correlate(scaled, scharr, mode="nearest"), ndimage.correlate(scaled, scharr.T, mode="nearest"))
    # the flat image has no phase congruency and no gradient: S_PC = T1 / (PC^2 + T1), S_G = T2 / (G^2 + T2)
    s_l = (0.85 / (pc**2 + 0.85)) * (160.0 / (g**2 + 160.0))
    assert fm.phase_congruency(flat * 255.0).max() == 0.0
    assert fm.fsim(a, flat) == pytest.approx(float((s_l * pc).sum() / pc.sum()), rel=1e-9)
