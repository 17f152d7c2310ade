"""Unsupervised MRI-PET fusion loss of DC2Fusion (Liu et al., ICONIP 2023, arXiv 2310.06291).

The fused volume ``F`` is pulled towards both sources by local correlation, structure and intensity::

    L = a1 LNCC(F, MRI) + a2 LNCC(F, PET)                  structure: local normalised cross-correlation
        + b1 (1 - SSIM(F, MRI)) + b2 (1 - SSIM(F, PET))    structure: SSIM
        + g1 |F - MRI|_1 + g2 |F - PET|_1                  intensity: mean absolute error
    a1 = b1 = g1 = 2,  a2 = b2 = g2 = 1.

Where this is in the paper: the loss function of the paper's method section (the structure-level LNCC and SSIM
terms and the pixel-level L1 terms of the fused image against each source, with the six weights above). Its
equation number is not given here because it could not be checked: the copies of the paper this project can read
hold only its abstract, and a number is not to be guessed. The terms and weights are those of the collection's
method notes (``METHODS.md`` section 4), and the same six terms with the weights 2/1/2/1/2/1 are what the authors'
training command (``--alpha1 2 --alpha2 1 --beta1 2 --beta2 1 --gamma1 2 --gamma2 1``) sets.

Built from MONAI's :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` and MONAI's SSIM formula
(:class:`~monai.losses.SSIMLoss`, or the equal but separable :class:`SeparableSSIMLoss`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss, SSIMLoss

from common.metrics.ssim import separable_ssim_map

__all__ = ["DC2FusionLoss", "SeparableSSIMLoss"]

TERM_NAMES = ("lncc_mri", "lncc_pet", "ssim_mri", "ssim_pet", "l1_mri", "l1_pet")
SSIM_BACKENDS = ("separable", "monai")


class SeparableSSIMLoss(nn.Module):
    """``1 - SSIM`` with a Gaussian window, filtered one axis at a time: ``(B, C, *S) x 2 -> scalar``.

    The same quantity as MONAI's :class:`~monai.losses.SSIMLoss` with ``kernel_type="gaussian"`` (the SSIM map of
    :func:`~common.metrics.ssim.separable_ssim_map` averaged over channels and voxels, then over the batch). MONAI
    convolves with the dense ``win^3`` kernel; the separable filtering is about 7 times faster on a 64^3 volume on
    CPU, which is what makes 3D training on a CPU practical. The tests check equality with MONAI's loss.

    Args:
        spatial_dims: 2 or 3.
        data_range: intensity range of the images (default 1.0).
        win_size: window edge in voxels (default 11); every spatial size must be at least this.
        kernel_sigma: Gaussian standard deviation (default 1.5).
        k1: luminance stability constant (default 0.01).
        k2: contrast stability constant (default 0.03).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        data_range: float = 1.0,
        win_size: int = 11,
        kernel_sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if win_size < 1 or kernel_sigma <= 0 or data_range <= 0:
            raise ValueError(
                f"win_size, kernel_sigma and data_range must be positive, got {win_size}, {kernel_sigma}, {data_range}."
            )
        self.spatial_dims = spatial_dims
        self.data_range = data_range
        self.win_size = win_size
        self.kernel_sigma = kernel_sigma
        self.k1, self.k2 = k1, k2

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected (B, C, {self.spatial_dims} spatial axes), got {tuple(x.shape)}.")
        ssim = separable_ssim_map(x, y, self.data_range, self.win_size, self.kernel_sigma, self.k1, self.k2)
        return (1 - ssim.flatten(1).mean(dim=1)).mean()  # per batch item over channels and voxels, then the batch


class DC2FusionLoss(nn.Module):
    """DC2Fusion loss: ``(fused, mri, pet)``, each ``(B, C, D, H, W)`` (or ``(B, C, H, W)`` with
    ``spatial_dims=2``) -> scalar; or ``(fused, sources)`` with MRI and PET stacked on the channel axis,
    ``(B, 2C, ...)``, the form MONAI's ``SupervisedTrainer`` passes when the batch's ``label`` holds the sources.

    Sign convention of the LNCC terms: MONAI's ``LocalNormalizedCrossCorrelationLoss`` returns
    ``-mean(LNCC^2)`` (the squared local correlation, in [-1, 0], -1 for a perfect match). With
    ``lncc_offset=True`` (default) each LNCC term is ``1 + that = 1 - mean(LNCC^2)`` in [0, 1], so every term is
    a non-negative distance and the loss is 0 when ``F == MRI == PET`` (for textured images; flat windows have
    zero correlation in MONAI's formula and keep the term above 0). The offset is a constant ``a1 + a2``: the
    gradients equal those of the paper's form, which ``lncc_offset=False`` reproduces.

    The unweighted terms of the last call are kept, detached, in :attr:`last_terms` (keys ``lncc_mri``,
    ``lncc_pet``, ``ssim_mri``, ``ssim_pet`` (these two are ``1 - SSIM``), ``l1_mri``, ``l1_pet``) for logging;
    :meth:`terms` returns them with gradients.

    Args:
        alpha1: weight of LNCC(F, MRI) (default 2).
        alpha2: weight of LNCC(F, PET) (default 1).
        beta1: weight of 1 - SSIM(F, MRI) (default 2).
        beta2: weight of 1 - SSIM(F, PET) (default 1).
        gamma1: weight of the mean absolute error to the MRI (default 2).
        gamma2: weight of the mean absolute error to the PET (default 1).
        spatial_dims: 3 (default) or 2.
        ncc_kernel_size: odd LNCC window edge in voxels (default 9, the VoxelMorph convention).
        ncc_kernel_type: ``"rectangular"`` (default), ``"triangular"`` or ``"gaussian"``.
        ssim_win: SSIM window edge in voxels (default 11, Wang et al. 2004); every spatial size must be at least
            this.
        ssim_sigma: standard deviation of the Gaussian SSIM window (default 1.5).
        data_range: intensity range of the images for SSIM (default 1.0, inputs scaled to [0, 1]).
        lncc_offset: report LNCC terms as ``1 - LNCC^2`` (default True) instead of MONAI's ``-LNCC^2``.
        ssim_backend: ``"separable"`` (default, :class:`SeparableSSIMLoss`) or ``"monai"`` (MONAI's ``SSIMLoss``,
            dense ``win^3`` kernel); both compute the same value.
    """

    def __init__(
        self,
        alpha1: float = 2.0,
        alpha2: float = 1.0,
        beta1: float = 2.0,
        beta2: float = 1.0,
        gamma1: float = 2.0,
        gamma2: float = 1.0,
        spatial_dims: int = 3,
        ncc_kernel_size: int = 9,
        ncc_kernel_type: str = "rectangular",
        ssim_win: int = 11,
        ssim_sigma: float = 1.5,
        data_range: float = 1.0,
        lncc_offset: bool = True,
        ssim_backend: str = "separable",
    ) -> None:
        super().__init__()
        named = {"alpha1": alpha1, "alpha2": alpha2, "beta1": beta1, "beta2": beta2, "gamma1": gamma1, "gamma2": gamma2}
        negative = {name: w for name, w in named.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if ncc_kernel_size < 1 or ncc_kernel_size % 2 == 0:
            raise ValueError(f"ncc_kernel_size must be a positive odd number, got {ncc_kernel_size}.")
        if ssim_win < 1:
            raise ValueError(f"ssim_win must be positive, got {ssim_win}.")
        if ssim_sigma <= 0 or data_range <= 0:
            raise ValueError(f"ssim_sigma and data_range must be positive, got {ssim_sigma} and {data_range}.")
        if ssim_backend not in SSIM_BACKENDS:
            raise ValueError(f"ssim_backend must be one of {SSIM_BACKENDS}, got {ssim_backend!r}.")
        self.weights = {term: float(w) for term, w in zip(TERM_NAMES, named.values())}
        self.spatial_dims = spatial_dims
        self.ssim_win = ssim_win
        self.lncc_offset = lncc_offset
        self.lncc = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=spatial_dims, kernel_size=ncc_kernel_size, kernel_type=ncc_kernel_type
        )
        self.ssim: nn.Module
        if ssim_backend == "separable":
            self.ssim = SeparableSSIMLoss(spatial_dims, data_range, ssim_win, ssim_sigma)
        else:
            self.ssim = SSIMLoss(
                spatial_dims=spatial_dims, data_range=data_range, win_size=ssim_win, kernel_sigma=ssim_sigma
            )
        self.last_terms: dict[str, torch.Tensor] = {}

    def _sources(
        self, fused: torch.Tensor, mri: torch.Tensor, pet: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fused.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected (B, C, {self.spatial_dims} spatial axes), got fused of shape {tuple(fused.shape)}."
            )
        if pet is None:
            c = fused.shape[1]
            if mri.shape[1] != 2 * c or mri.shape[0] != fused.shape[0] or mri.shape[2:] != fused.shape[2:]:
                raise ValueError(
                    f"with pet=None the second input must stack MRI and PET on the channel axis, (B, {2 * c}, ...) "
                    f"for fused of shape {tuple(fused.shape)}; got {tuple(mri.shape)}."
                )
            mri, pet = mri[:, :c], mri[:, c:]
        if mri.shape != fused.shape or pet.shape != fused.shape:
            raise ValueError(
                f"fused, mri and pet must share one shape, got {tuple(fused.shape)}, {tuple(mri.shape)}, "
                f"{tuple(pet.shape)}."
            )
        if min(fused.shape[2:]) < self.ssim_win:
            raise ValueError(f"spatial size {tuple(fused.shape[2:])} is smaller than the SSIM window {self.ssim_win}.")
        return mri, pet

    def terms(self, fused: torch.Tensor, mri: torch.Tensor, pet: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The six unweighted terms (scalars with gradients), keyed as in :attr:`last_terms`."""
        mri, pet = self._sources(fused, mri, pet)
        offset = 1.0 if self.lncc_offset else 0.0
        return {
            "lncc_mri": offset + self.lncc(fused, mri),
            "lncc_pet": offset + self.lncc(fused, pet),
            "ssim_mri": self.ssim(fused, mri),
            "ssim_pet": self.ssim(fused, pet),
            "l1_mri": F.l1_loss(fused, mri),
            "l1_pet": F.l1_loss(fused, pet),
        }

    def forward(self, fused: torch.Tensor, mri: torch.Tensor, pet: torch.Tensor | None = None) -> torch.Tensor:
        terms = self.terms(fused, mri, pet)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()
