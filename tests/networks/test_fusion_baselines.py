"""Tests of common/networks/fusion_baselines.py: the classical fusion methods DC2Fusion is compared with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.networks import fusion_baselines as fb


def _smooth(seed: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    x = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return (x - x.min()) / (x.max() - x.min())


@pytest.fixture(scope="module")
def mri_pet() -> tuple[np.ndarray, np.ndarray]:
    """A fixed non-cubic MRI-like (fine texture) / PET-like (smooth) pair in [0, 1]."""
    return _smooth(2, (20, 24, 16), 1.0), _smooth(3, (20, 24, 16), 3.0)


def _detail(x: np.ndarray) -> float:
    return float(np.std(x - ndimage.gaussian_filter(x, 1.0)))


def test_average_and_maximum_fusion_keep_the_input_type():
    a, b = torch.tensor([[0.2, 0.9]]), torch.tensor([[0.6, 0.1]])
    torch.testing.assert_close(fb.average_fusion(a, b), torch.tensor([[0.4, 0.5]]))
    torch.testing.assert_close(fb.maximum_fusion(a, b), torch.tensor([[0.6, 0.9]]))
    np.testing.assert_allclose(fb.maximum_fusion(a.numpy(), b.numpy()), [[0.6, 0.9]])
    with pytest.raises(ValueError, match="same shape"):
        fb.average_fusion(a, b[:, :1])
    with pytest.raises(ValueError, match="both be numpy arrays or both torch"):
        fb.maximum_fusion(a, b.numpy())


def test_laplacian_pyramid_fusion_is_exact_on_identical_inputs_and_keeps_details(mri_pet):
    mri, pet = mri_pet
    np.testing.assert_allclose(fb.laplacian_pyramid_fusion(mri, mri, levels=3), mri, atol=1e-12)
    flat = np.full_like(mri, 0.5)
    fused = fb.laplacian_pyramid_fusion(mri, flat, levels=3)
    assert _detail(fused) == pytest.approx(_detail(mri), rel=0.05)  # choose-max keeps MRI details
    assert _detail(fb.average_fusion(mri, flat)) == pytest.approx(0.5 * _detail(mri), rel=1e-6)
    batch = torch.from_numpy(np.stack([mri, pet]))[:, None].float()  # (B, 1, D, H, W): fused per item
    out = fb.laplacian_pyramid_fusion(batch, batch.flip(0), levels=2)
    assert isinstance(out, torch.Tensor) and out.shape == batch.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[0], out[1])  # the fusion rule is symmetric in its inputs


def test_guided_filter_matches_a_brute_force_window_computation():
    rng = np.random.default_rng(0)
    guide, source = rng.random((7, 6)), rng.random((7, 6))
    radius, eps = 1, 0.01
    pad = np.pad(guide, radius, mode="edge"), np.pad(source, radius, mode="edge")
    a, b = np.empty_like(guide), np.empty_like(guide)
    for i in range(7):
        for j in range(6):  # the linear model I -> p fitted by least squares (ridge eps) in the window at (i, j)
            wi, wp = (x[i : i + 3, j : j + 3].ravel() for x in pad)
            a[i, j] = (np.mean(wi * wp) - wi.mean() * wp.mean()) / (wi.var() + eps)
            b[i, j] = wp.mean() - a[i, j] * wi.mean()
    pa, pb = np.pad(a, radius, mode="edge"), np.pad(b, radius, mode="edge")
    mean_a = np.array([[pa[i : i + 3, j : j + 3].mean() for j in range(6)] for i in range(7)])
    mean_b = np.array([[pb[i : i + 3, j : j + 3].mean() for j in range(6)] for i in range(7)])
    np.testing.assert_allclose(fb.guided_filter(guide, source, radius, eps), mean_a * guide + mean_b, atol=1e-12)


def test_guided_filter_preserves_the_guide_edges_and_smooths_with_large_eps(mri_pet):
    mri, _ = mri_pet
    np.testing.assert_allclose(fb.guided_filter(mri, mri, 2, 1e-9), mri, atol=1e-4)  # self-guided, tiny eps: identity
    smooth = fb.guided_filter(mri, mri, 2, 1e6)  # huge eps: a = 0, two box means of the source
    box = ndimage.uniform_filter(ndimage.uniform_filter(mri, 5, mode="nearest"), 5, mode="nearest")
    np.testing.assert_allclose(smooth, box, atol=1e-5)


def test_guided_filter_fusion_is_exact_on_identical_inputs_and_takes_the_salient_details(mri_pet):
    mri, pet = mri_pet
    np.testing.assert_allclose(fb.guided_filter_fusion(mri, mri), mri, atol=1e-12)
    flat = np.full_like(mri, 0.5)
    fused = fb.guided_filter_fusion(mri, flat)
    assert _detail(fused) == pytest.approx(_detail(mri), rel=0.05)  # the textured source has all the saliency
    fused = fb.guided_filter_fusion(flat, pet)
    assert _detail(fused) == pytest.approx(_detail(pet), rel=0.05)
    volume = torch.from_numpy(np.stack([mri, pet]))[:, None]  # (B, 1, D, H, W) tensors, fused per item in 3D
    out = fb.guided_filter_fusion(volume, volume.flip(0))
    assert isinstance(out, torch.Tensor) and out.shape == volume.shape
    np.testing.assert_allclose(out[0, 0].numpy(), fb.guided_filter_fusion(mri, pet), atol=1e-12)
    with pytest.raises(ValueError, match="base_radius"):
        fb.guided_filter_fusion(mri, pet, base_radius=0)


def test_baseline_registry_names_the_four_baselines(mri_pet):
    mri, pet = mri_pet
    assert list(fb.BASELINES) == ["average", "maximum", "laplacian_pyramid", "guided_filter"]
    np.testing.assert_array_equal(fb.BASELINES["maximum"](mri, pet), np.maximum(mri, pet))
    np.testing.assert_array_equal(fb.BASELINES["guided_filter"](mri, pet), fb.guided_filter_fusion(mri, pet))
