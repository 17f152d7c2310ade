"""Image fusion quality metrics, for 2D slices and 3D volumes.

Metrics compare a fused image ``F`` with its sources (MRI and PET): PSNR, SSIM, normalised mutual information
(NMI), mutual information (MI), entropy (EN), the Xydeas-Petrovic edge preservation index Q^{AB/F} (Qabf) and
FSIM. :func:`fusion_metrics` gathers them over a whole volume, or over one slice as in the DC2Fusion paper
(Liu et al., ICONIP 2023: axial slice 64 of the 128^3 volume, :data:`PAPER_SLICE_INDEX`), averaging each pairwise
metric over (F, MRI) and (F, PET) like the paper.

:class:`FusionScorer` scores many candidate fusions of one MRI-PET pair, computing the sources' FSIM and edge maps
once. :func:`rank_methods` ranks methods by the summary of :data:`RANKING_METRICS` (SSIM averaged over the two
sources, Qabf, and the lower of the two PSNRs): averaged PSNR rewards copying one source (its PSNR against that
source is infinite), the lower PSNR does not.

The classical fusion baselines the metrics are compared on are methods, not metrics: see
:mod:`common.networks.fusion_baselines`.

Inputs are numpy arrays or torch tensors of one image, ``(H, W)`` or ``(D, H, W)``; leading singleton axes
(batch, channel) are dropped. Intensities are expected in ``[0, data_range]`` (DC2Fusion scales to [0, 1]).
Volumes loaded with MONAI's ``LoadImage`` + ``Orientation("RAS")`` are ``(X, Y, Z)``, so axial slices lie along
the last axis: ``axis=-1`` (the default) everywhere below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from common.metrics.ssim import separable_ssim_map

__all__ = [
    "PAPER_SLICE_INDEX",
    "RANKING_METRICS",
    "FusionScorer",
    "rank_methods",
    "take_slice",
    "psnr",
    "ssim",
    "entropy",
    "mutual_information",
    "normalized_mutual_information",
    "qabf",
    "phase_congruency",
    "fsim",
    "fusion_metrics",
]

ArrayLike = np.ndarray | torch.Tensor

#: the DC2Fusion paper evaluates axial slice 64 of its 128^3 volumes
PAPER_SLICE_INDEX = 64
#: the summary methods are ranked by; higher is better for each
RANKING_METRICS = ("ssim", "qabf", "psnr_min")


def _as_image(x: ArrayLike, name: str = "image") -> np.ndarray:
    """One image as float64 ``(H, W)`` or ``(D, H, W)``, leading singleton axes dropped."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64, copy=False)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be one 2D or 3D image (leading singleton axes allowed), got shape {x.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return arr


def _as_pair(
    a: ArrayLike, b: ArrayLike, names: tuple[str, str] = ("image", "reference")
) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = _as_image(a, names[0]), _as_image(b, names[1])
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a_arr.shape} and {b_arr.shape}.")
    return a_arr, b_arr


def _as_slices(image: np.ndarray, axis: int) -> np.ndarray:
    """``(H, W) -> (1, H, W)``; ``(D, H, W) -> (S, ., .)`` with the slices along ``axis`` first."""
    if image.ndim == 2:
        return image[None]
    return np.moveaxis(image, axis, 0)


def take_slice(volume: ArrayLike, slice_index: int = PAPER_SLICE_INDEX, axis: int = -1) -> np.ndarray:
    """The 2D slice ``slice_index`` of a 3D volume along ``axis`` (default: the paper's axial slice 64)."""
    arr = _as_image(volume, "volume")
    if arr.ndim != 3:
        raise ValueError(f"take_slice needs a 3D volume, got shape {arr.shape}.")
    size = arr.shape[axis]
    if not -size <= slice_index < size:
        raise ValueError(f"slice_index {slice_index} is outside axis {axis} of size {size}.")
    return np.take(arr, slice_index, axis=axis)


def psnr(image: ArrayLike, reference: ArrayLike, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; ``inf`` for identical images.

    Same definition as ``skimage.metrics.peak_signal_noise_ratio`` with an explicit ``data_range``.
    """
    a, b = _as_pair(image, reference)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(
    image: ArrayLike, reference: ArrayLike, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5
) -> float:
    """Mean structural similarity (Wang et al. 2004) with a Gaussian window, 2D or 3D by the input's dimension.

    MONAI's SSIM (K1 = 0.01, K2 = 0.03, population covariances, the map taken where the window fits, i.e. without
    padding), computed in float64 with separable filtering (:func:`~common.metrics.ssim.separable_ssim_map`).
    ``skimage.metrics.structural_similarity(..., data_range=1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` uses the same window and the same cropped mean; the two agree to 1e-10.
    """
    a, b = _as_pair(image, reference)
    if min(a.shape) < win_size:
        raise ValueError(f"image of shape {a.shape} is smaller than the SSIM window {win_size}.")
    return float(separable_ssim_map(a[None, None], b[None, None], data_range, win_size, sigma).mean())


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    p = p / p.sum()
    return float(-(p * np.log2(p)).sum())


def _value_range(a: np.ndarray, value_range: tuple[float, float] | None) -> tuple[float, float]:
    lo, hi = (float(a.min()), float(a.max())) if value_range is None else (float(value_range[0]), float(value_range[1]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)  # a constant image still needs a non-empty range


def entropy(image: ArrayLike, bins: int = 256, value_range: tuple[float, float] | None = (0.0, 1.0)) -> float:
    """Shannon entropy in bits of the intensity histogram (``bins`` bins over ``value_range``).

    Values outside ``value_range`` are clipped into it; ``value_range=None`` uses the image's min and max.
    """
    a = _as_image(image)
    lo, hi = _value_range(a, value_range)
    hist, _ = np.histogram(np.clip(a, lo, hi), bins=bins, range=(lo, hi))
    return _entropy_bits(hist.astype(np.float64))


def _joint_histogram(a: np.ndarray, b: np.ndarray, bins: int, value_range: tuple[float, float] | None) -> np.ndarray:
    if value_range is None:  # each image over its own min..max, as numpy.histogramdd (and skimage) do
        ra, rb = _value_range(a, None), _value_range(b, None)
    else:
        ra = rb = _value_range(a, value_range)
    a, b = np.clip(a, *ra), np.clip(b, *rb)
    hist, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins, range=[ra, rb])
    return hist


def mutual_information(
    image: ArrayLike, reference: ArrayLike, bins: int = 256, value_range: tuple[float, float] | None = (0.0, 1.0)
) -> float:
    """Mutual information in bits, ``H(A) + H(B) - H(A, B)``, from a ``bins x bins`` joint histogram.

    Both images share ``value_range`` (values outside are clipped; None: each image's own min..max).
    ``MI(A, A) = H(A)``, the entropy with the same bins.
    """
    a, b = _as_pair(image, reference)
    joint = _joint_histogram(a, b, bins, value_range)
    return _entropy_bits(joint.sum(axis=1)) + _entropy_bits(joint.sum(axis=0)) - _entropy_bits(joint.ravel())


def normalized_mutual_information(
    image: ArrayLike, reference: ArrayLike, bins: int = 100, value_range: tuple[float, float] | None = None
) -> float:
    """Normalised mutual information ``(H(A) + H(B)) / H(A, B)``, in [1, 2] (Studholme et al. 1999).

    The defaults (100 bins, each image binned over its own min..max) reproduce
    ``skimage.metrics.normalized_mutual_information``.
    """
    a, b = _as_pair(image, reference)
    joint = _joint_histogram(a, b, bins, value_range)
    h_joint = _entropy_bits(joint.ravel())
    if h_joint == 0:  # both images constant
        return 2.0
    return (_entropy_bits(joint.sum(axis=1)) + _entropy_bits(joint.sum(axis=0))) / h_joint


def _filter_slices(slices: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2D correlation of every slice of ``(S, H, W)`` (edges replicated)."""
    return ndimage.correlate(slices, kernel[None], mode="nearest")


_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _edge_strength_orientation(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sx = _filter_slices(slices, _SOBEL_X)
    sy = _filter_slices(slices, _SOBEL_X.T)
    strength = np.hypot(sx, sy)
    safe_sx = np.where(sx == 0, 1.0, sx)
    orientation = np.where(sx == 0, np.pi / 2, np.arctan(sy / safe_sx))  # in (-pi/2, pi/2]
    return strength, orientation


def qabf(
    fused: ArrayLike,
    source_a: ArrayLike,
    source_b: ArrayLike,
    axis: int = -1,
    weight_exponent: float = 1.0,
    gamma_g: float = 0.9994,
    kappa_g: float = -15.0,
    sigma_g: float = 0.5,
    gamma_a: float = 0.9879,
    kappa_a: float = -22.0,
    sigma_a: float = 0.8,
    wrap_orientation: bool = True,
) -> float:
    """Edge information preservation Q^{AB/F} (Xydeas & Petrovic, Electronics Letters 36(4), 2000), in [0, ~1].

    Per pixel, with Sobel edge strength ``g`` and orientation ``alpha = arctan(s_y / s_x)``::

        G^{AF} = min(g_A, g_F) / max(g_A, g_F)              (1 where both are 0)
        A^{AF} = 1 - |alpha_A - alpha_F| / (pi / 2)
        Q^{AF} = gamma_g / (1 + exp(kappa_g (G^{AF} - sigma_g))) * gamma_a / (1 + exp(kappa_a (A^{AF} - sigma_a)))
        Q^{AB/F} = sum(Q^{AF} g_A^L + Q^{BF} g_B^L) / sum(g_A^L + g_B^L)

    The defaults are the constants of the widely used reference scripts (L = 1, 0.9994, -15, 0.5, 0.9879, -22,
    0.8), so values compare with published tables. With ``wrap_orientation=True`` the orientation difference is
    taken modulo pi (an edge direction has no sign), so ``A^{AF}`` lies in [0, 1]; False reproduces the scripts
    that skip the wrap and punish near-vertical edges whose ``arctan`` flips sign. Sobel filtering replicates the
    image edge (the MATLAB scripts zero-pad, which only changes the outermost pixel ring).

    2D images give one value. For 3D volumes the index is computed on every 2D slice along ``axis`` (axial by
    default) and averaged over the slices that have edges in a source; slices without any edge are skipped.
    Returns NaN when no slice has an edge.
    """
    f = _as_image(fused, "fused")
    a, b = _as_pair(source_a, source_b, ("source_a", "source_b"))
    if a.shape != f.shape:
        raise ValueError(f"fused and sources must have the same shape, got {f.shape} and {a.shape}.")
    edges = [_edge_strength_orientation(_as_slices(x, axis)) for x in (f, a, b)]
    params = {
        "weight_exponent": weight_exponent,
        "gamma_g": gamma_g,
        "kappa_g": kappa_g,
        "sigma_g": sigma_g,
        "gamma_a": gamma_a,
        "kappa_a": kappa_a,
        "sigma_a": sigma_a,
        "wrap_orientation": wrap_orientation,
    }
    return _qabf_from_edges(*edges, **params)


_Edges = tuple[np.ndarray, np.ndarray]


def _qabf_from_edges(
    fused: _Edges,
    source_a: _Edges,
    source_b: _Edges,
    weight_exponent: float = 1.0,
    gamma_g: float = 0.9994,
    kappa_g: float = -15.0,
    sigma_g: float = 0.5,
    gamma_a: float = 0.9879,
    kappa_a: float = -22.0,
    sigma_a: float = 0.8,
    wrap_orientation: bool = True,
) -> float:
    """Q^{AB/F} from the ``(strength, orientation)`` maps of ``(S, H, W)`` slices (see :func:`qabf`)."""
    g_f, o_f = fused

    def preservation(source: _Edges) -> tuple[np.ndarray, np.ndarray]:
        g_s, o_s = source
        high = np.maximum(g_s, g_f)
        strength = np.where(high > 0, np.minimum(g_s, g_f) / np.where(high > 0, high, 1.0), 1.0)
        diff = np.abs(o_s - o_f)
        if wrap_orientation:
            diff = np.minimum(diff, np.pi - diff)
        orient = 1.0 - diff / (np.pi / 2)
        q_g = gamma_g / (1.0 + np.exp(kappa_g * (strength - sigma_g)))
        q_a = gamma_a / (1.0 + np.exp(kappa_a * (orient - sigma_a)))
        return q_g * q_a, g_s**weight_exponent

    q_a_f, w_a = preservation(source_a)
    q_b_f, w_b = preservation(source_b)
    numerator = (q_a_f * w_a + q_b_f * w_b).sum(axis=(1, 2))
    denominator = (w_a + w_b).sum(axis=(1, 2))
    has_edges = denominator > 0
    if not has_edges.any():
        return math.nan
    return float(np.mean(numerator[has_edges] / denominator[has_edges]))


_PC_CHUNK = 16  # slices per FFT batch in phase_congruency


def _lowpass_radius(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised frequency radius (0.5 = Nyquist) and angle of the unshifted 2D FFT grid."""
    fx, fy = np.meshgrid(np.fft.fftfreq(cols), np.fft.fftfreq(rows))
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0  # the DC term gets zero weight below; this only avoids log(0)
    return radius, np.arctan2(-fy, fx)


def phase_congruency(
    image: ArrayLike,
    n_scales: int = 4,
    n_orientations: int = 4,
    min_wavelength: float = 6.0,
    mult: float = 2.0,
    sigma_onf: float = 0.55,
    d_theta_on_sigma: float = 1.2,
    k: float = 2.0,
    eps: float = 1e-4,
) -> np.ndarray:
    """Phase congruency of a 2D image or of every 2D slice of ``(S, H, W)``, values in [0, 1].

    Kovesi's energy model ("Image features from phase congruency", Videre 1(3), 1999) with the log-Gabor bank
    and settings of the FSIM paper (Zhang et al., IEEE TIP 20(8), 2011): 4 scales from a 6-pixel wavelength
    growing by 2, 4 orientations, ``sigma_onf = 0.55``, angular spread ``pi / 4 / 1.2``, a Butterworth low-pass
    (cut-off 0.45, order 15). Per orientation the local energy ``sum_s (e_s cos phi + o_s sin phi -
    |e_s sin phi - o_s cos phi|)`` is reduced by a noise threshold ``(E[noise] + k sigma[noise]) / 1.7``
    estimated from the median response of the smallest scale (Rayleigh model), and
    ``PC = sum_o max(energy_o - T_o, 0) / (sum_o sum_s A_so + eps)``. The frequency-spread weighting of
    Kovesi's later versions is not used (FSIM does not use it).
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim not in (2, 3):
        raise ValueError(f"phase_congruency takes (H, W) or (S, H, W), got shape {arr.shape}.")
    slices = arr[None] if arr.ndim == 2 else arr
    _, rows, cols = slices.shape
    radius, angle = _lowpass_radius(rows, cols)
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)
    log_gabors = []
    for s in range(n_scales):
        centre = 1.0 / (min_wavelength * mult**s)
        lg = np.exp(-(np.log(radius / centre) ** 2) / (2 * math.log(sigma_onf) ** 2)) * lowpass
        lg[0, 0] = 0.0
        log_gabors.append(lg)
    theta_sigma = math.pi / n_orientations / d_theta_on_sigma
    bank = []  # per orientation: the frequency-domain filters, and the noise-model constants of the bank
    for o in range(n_orientations):
        phi = o * math.pi / n_orientations
        d_theta = np.abs(np.arctan2(np.sin(angle - phi), np.cos(angle - phi)))
        spread = np.exp(-(d_theta**2) / (2 * theta_sigma**2))
        filters = [lg * spread for lg in log_gabors]
        spatial = [np.real(np.fft.ifft2(f)) * math.sqrt(rows * cols) for f in filters]
        sum_an2 = sum(float((f**2).sum()) for f in spatial)
        sum_aiaj = sum(float((spatial[i] * spatial[j]).sum()) for i in range(n_scales) for j in range(i + 1, n_scales))
        bank.append((filters, float((filters[0] ** 2).sum()), sum_an2, sum_aiaj))
    pc = np.empty_like(slices)
    for start in range(0, len(slices), _PC_CHUNK):  # bounded memory for long stacks of slices
        chunk = slices[start : start + _PC_CHUNK]
        spectrum = np.fft.fft2(chunk)
        energy_all = np.zeros_like(chunk)
        amplitude_all = np.zeros_like(chunk)
        for filters, first_filter_energy, sum_an2, sum_aiaj in bank:
            responses = [np.fft.ifft2(spectrum * f) for f in filters]
            sum_e = sum(r.real for r in responses)
            sum_o = sum(r.imag for r in responses)
            amplitude_all += sum(np.abs(r) for r in responses)
            norm = np.sqrt(sum_e**2 + sum_o**2) + eps
            mean_e, mean_o = sum_e / norm, sum_o / norm
            energy = sum(
                r.real * mean_e + r.imag * mean_o - np.abs(r.real * mean_o - r.imag * mean_e) for r in responses
            )
            # noise: the smallest scale's median squared amplitude gives the Rayleigh parameter of pure noise
            median_e2 = np.median((np.abs(responses[0]) ** 2).reshape(len(chunk), -1), axis=1)
            noise_power = (-median_e2 / math.log(0.5)) / first_filter_energy
            tau = np.sqrt((2 * noise_power * sum_an2 + 4 * noise_power * sum_aiaj) / 2)
            threshold = (tau * math.sqrt(math.pi / 2) + k * np.sqrt((2 - math.pi / 2) * tau**2)) / 1.7
            energy_all += np.maximum(energy - threshold[:, None, None], 0.0)
        pc[start : start + _PC_CHUNK] = energy_all / (amplitude_all + eps)
    return pc[0] if arr.ndim == 2 else pc


_SCHARR_X = np.array([[3.0, 0.0, -3.0], [10.0, 0.0, -10.0], [3.0, 0.0, -3.0]]) / 16.0


def _fsim_maps(slices: np.ndarray, data_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Phase congruency and Scharr gradient magnitude of ``(S, H, W)`` on the 8-bit scale FSIM is tuned for."""
    scaled = slices * (255.0 / data_range)
    factor = max(1, int(math.floor(min(slices.shape[1:]) / 256 + 0.5)))
    if factor > 1:  # FSIM's own down-sampling of large images
        scaled = ndimage.uniform_filter(scaled, size=(1, factor, factor), mode="nearest")[:, ::factor, ::factor]
    gradient = np.hypot(_filter_slices(scaled, _SCHARR_X), _filter_slices(scaled, _SCHARR_X.T))
    return phase_congruency(scaled), gradient


def _fsim_from_maps(maps1: tuple[np.ndarray, np.ndarray], maps2: tuple[np.ndarray, np.ndarray]) -> float:
    (pc1, g1), (pc2, g2) = maps1, maps2
    t1, t2 = 0.85, 160.0
    similarity = ((2 * pc1 * pc2 + t1) / (pc1**2 + pc2**2 + t1)) * ((2 * g1 * g2 + t2) / (g1**2 + g2**2 + t2))
    pc_max = np.maximum(pc1, pc2)
    weight = pc_max.sum(axis=(1, 2))
    valid = weight > 0
    if not valid.any():
        return math.nan
    return float(np.mean((similarity * pc_max).sum(axis=(1, 2))[valid] / weight[valid]))


def fsim(image: ArrayLike, reference: ArrayLike, data_range: float = 1.0, axis: int = -1) -> float:
    """Feature similarity index FSIM for grayscale images (Zhang, Zhang, Mou & Zhang, IEEE TIP 20(8), 2011).

    ``S_L = S_PC * S_G`` with ``S_PC = (2 PC_1 PC_2 + T_1) / (PC_1^2 + PC_2^2 + T_1)`` (T_1 = 0.85) and
    ``S_G = (2 G_1 G_2 + T_2) / (G_1^2 + G_2^2 + T_2)`` (T_2 = 160); ``FSIM = sum(S_L PC_m) / sum(PC_m)``,
    ``PC_m = max(PC_1, PC_2)``. Phase congruency as in :func:`phase_congruency`, gradient magnitude from the
    Scharr operator. Images are rescaled from ``[0, data_range]`` to [0, 255], the range T_2 was tuned on, and
    down-sampled by ``round(min(H, W) / 256)`` like the reference implementation. Filtering replicates edges.

    FSIM is 2D: 3D volumes are scored slice by slice along ``axis`` (axial by default) and averaged over the
    slices with phase congruency (flat slices are skipped; NaN if all are flat). ``FSIM(x, x) = 1``.
    """
    a, b = _as_pair(image, reference)
    return _fsim_from_maps(_fsim_maps(_as_slices(a, axis), data_range), _fsim_maps(_as_slices(b, axis), data_range))


class FusionScorer:
    """Every fusion metric of candidate fused images against one MRI-PET pair, whole image or one slice.

    The sources' FSIM maps (phase congruency and gradient), Sobel edges and entropies are computed once, so scoring
    several methods on one case costs little more than scoring one. ``FusionScorer(mri, pet)(fused)`` equals
    :func:`fusion_metrics` ``(fused, mri, pet)``.

    Args:
        mri, pet: one 2D or 3D image each, same shape (leading singleton axes allowed), in ``[0, data_range]``.
        slice_index: None (default) scores the whole image (3D PSNR, 3D SSIM, histograms of all voxels; Qabf and
            FSIM slice by slice along ``axis``); an integer scores that 2D slice only, e.g.
            :data:`PAPER_SLICE_INDEX` for the paper's protocol.
        axis: slice axis (default -1, axial for RAS volumes).
        data_range: intensity range for PSNR, SSIM and FSIM (default 1.0).
        bins: histogram bins over ``[0, data_range]`` for MI and entropy (default 256).
        nmi_bins: bins of NMI, skimage's convention (default 100).
    """

    def __init__(
        self,
        mri: ArrayLike,
        pet: ArrayLike,
        slice_index: int | None = None,
        axis: int = -1,
        data_range: float = 1.0,
        bins: int = 256,
        nmi_bins: int = 100,
    ) -> None:
        m, p = _as_pair(mri, pet, ("mri", "pet"))
        if data_range <= 0 or bins < 2 or nmi_bins < 2:
            raise ValueError(f"data_range must be positive and bins >= 2, got {data_range}, {bins}, {nmi_bins}.")
        self.shape = m.shape
        self.slice_index, self.axis = slice_index, axis
        self.data_range, self.bins, self.nmi_bins = data_range, bins, nmi_bins
        if slice_index is not None:
            m, p = take_slice(m, slice_index, axis), take_slice(p, slice_index, axis)
        self.sources = {"mri": m, "pet": p}
        value_range = (0.0, data_range)
        self._fsim_maps = {name: _fsim_maps(_as_slices(src, axis), data_range) for name, src in self.sources.items()}
        self._edges = {name: _edge_strength_orientation(_as_slices(src, axis)) for name, src in self.sources.items()}
        self._entropy = {name: entropy(src, bins=bins, value_range=value_range) for name, src in self.sources.items()}

    def __call__(self, fused: ArrayLike) -> dict[str, float]:
        """The metrics of ``fused`` (same shape as the sources); keys as in :func:`fusion_metrics`."""
        f = _as_image(fused, "fused")
        if f.shape != self.shape:
            raise ValueError(f"fused must have the sources' shape {self.shape}, got {f.shape}.")
        if self.slice_index is not None:
            f = take_slice(f, self.slice_index, self.axis)
        value_range = (0.0, self.data_range)
        fused_maps = _fsim_maps(_as_slices(f, self.axis), self.data_range)
        result: dict[str, float] = {}
        for name, src in self.sources.items():
            result[f"psnr_{name}"] = psnr(f, src, self.data_range)
            result[f"ssim_{name}"] = ssim(f, src, self.data_range)
            result[f"nmi_{name}"] = normalized_mutual_information(f, src, bins=self.nmi_bins)
            result[f"mi_{name}"] = mutual_information(f, src, bins=self.bins, value_range=value_range)
            result[f"fsim_{name}"] = _fsim_from_maps(fused_maps, self._fsim_maps[name])
            result[f"entropy_{name}"] = self._entropy[name]
        for metric in ("psnr", "ssim", "nmi", "mi", "fsim"):
            result[metric] = 0.5 * (result[f"{metric}_mri"] + result[f"{metric}_pet"])
        result["psnr_min"] = min(result["psnr_mri"], result["psnr_pet"])
        edges = _edge_strength_orientation(_as_slices(f, self.axis))
        result["qabf"] = _qabf_from_edges(edges, self._edges["mri"], self._edges["pet"])
        result["entropy"] = entropy(f, bins=self.bins, value_range=value_range)
        return result


def fusion_metrics(
    fused: ArrayLike,
    mri: ArrayLike,
    pet: ArrayLike,
    slice_index: int | None = None,
    axis: int = -1,
    data_range: float = 1.0,
    bins: int = 256,
    nmi_bins: int = 100,
) -> dict[str, float]:
    """All fusion metrics of ``fused`` against ``mri`` and ``pet``, on the whole image or on one slice.

    Args:
        fused, mri, pet: one 2D or 3D image each, same shape (leading singleton axes allowed).
        slice_index: None (default) scores the whole image (3D PSNR, 3D SSIM, histograms of all voxels; Qabf and
            FSIM slice by slice along ``axis``); an integer scores that 2D slice only, e.g.
            :data:`PAPER_SLICE_INDEX` for the paper's protocol.
        axis: slice axis (default -1, axial for RAS volumes).
        data_range: intensity range for PSNR, SSIM and FSIM (default 1.0).
        bins: histogram bins over ``[0, data_range]`` for MI and entropy (default 256).
        nmi_bins: bins of NMI, skimage's convention (default 100).

    Returns:
        ``psnr, ssim, nmi, mi, fsim``: means over (F, MRI) and (F, PET), each also as ``<name>_mri`` and
        ``<name>_pet``; ``psnr_min = min(psnr_mri, psnr_pet)`` (a copy of one source scores high on its own pair
        but low here); ``qabf`` (one value for the triple); ``entropy`` of F and ``entropy_mri``,
        ``entropy_pet`` of the sources.
    """
    f = _as_image(fused, "fused")
    for name, src in (("mri", mri), ("pet", pet)):
        if _as_image(src, name).shape != f.shape:
            raise ValueError(f"fused and {name} must have the same shape, got {f.shape} and {_as_image(src).shape}.")
    return FusionScorer(mri, pet, slice_index, axis, data_range, bins, nmi_bins)(f)


def rank_methods(
    scores: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = RANKING_METRICS
) -> dict[str, dict[str, float]]:
    """Rank fusion methods on each of ``metrics`` (higher is better) and overall by their mean rank.

    Rank 1 is the best; tied values share the better rank (1, 2, 2, 4); a NaN ranks last. The overall order is
    by mean rank, lower first.

    Args:
        scores: ``{method: {metric: value}}``, e.g. per-method means of :func:`fusion_metrics` over cases.
        metrics: the metrics to rank by (default :data:`RANKING_METRICS`).

    Returns:
        ``{method: {"rank_<metric>": r, ..., "mean_rank": m, "position": p}}`` with ``position`` 1 for the method
        of lowest mean rank (ties share a position), in that order.
    """
    if not scores:
        raise ValueError("no methods to rank.")
    missing = {m: [k for k in metrics if k not in v] for m, v in scores.items()}
    missing = {m: k for m, k in missing.items() if k}
    if missing:
        raise ValueError(f"methods lack ranking metrics: {missing}.")
    ranks: dict[str, dict[str, float]] = {method: {} for method in scores}
    for metric in metrics:
        values = {m: float(v[metric]) for m, v in scores.items()}
        for method, value in values.items():
            better = sum(
                1 for other in values.values() if not math.isnan(other) and (math.isnan(value) or other > value)
            )
            ranks[method][f"rank_{metric}"] = float(1 + better)
    for r in ranks.values():
        r["mean_rank"] = float(np.mean([r[f"rank_{metric}"] for metric in metrics]))
    for r in ranks.values():
        r["position"] = float(1 + sum(1 for other in ranks.values() if other["mean_rank"] < r["mean_rank"]))
    return dict(sorted(ranks.items(), key=lambda item: item[1]["mean_rank"]))
