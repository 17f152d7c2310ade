"""Fourier-space feature parser (FF-Parser) of MedSegDiff.

Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic Model", MIDL 2023
(arXiv 2211.00611), section "FF-Parser": a learnable complex map ``A`` filters the spectrum of a feature map,

    M = FFT[m],    M' = A * M,    m' = IFFT[M'],

so the network can learn to damp the high-frequency noise of the noisy-mask features ``m``.

Unlike the official code, the block works for any input size and for 2D and 3D features: ``A`` is
stored at a reference size and resampled to the spectrum of the actual input when the sizes differ
(see :class:`FFParser`). MONAI has no learnable spectral filter (``monai.networks.blocks.fft_utils_t``
holds only centred FFT helpers for MRI k-space), hence this block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FFParser", "rfft_grid_size"]


def rfft_grid_size(spatial_size: Sequence[int]) -> tuple[int, ...]:
    """Shape of ``torch.fft.rfftn`` over all of ``spatial_size``: the last axis keeps ``n // 2 + 1`` bins."""
    spatial_size = tuple(int(s) for s in spatial_size)
    return (*spatial_size[:-1], spatial_size[-1] // 2 + 1)


class FFParser(nn.Module):
    """Learnable per-channel complex filter in Fourier space: ``(B, C, *spatial) -> (B, C, *spatial)``.

    ``m' = irfftn(A * rfftn(m, norm="ortho"), s=spatial, norm="ortho")`` over the spatial axes, with one
    complex map ``A`` of shape ``(C, *rfft_grid)`` per channel (``rfft_grid`` = spatial size with the last
    axis halved plus one, i.e. :func:`rfft_grid_size`). The real FFT is used because features are real;
    the spectrum is then Hermitian, so the half-spectrum carries everything and ``irfftn`` returns a real
    map. ``A`` is initialised to ``1 + 0j`` by default, which makes the block an exact identity (up to
    float error) at the start of training.

    Any input size: ``A`` is stored at ``spatial_size`` (the reference, e.g. the training patch size of
    the stage) and treated as a function of the *normalised* frequency (cycles per sample, in [-0.5, 0.5]
    on each axis). For an input whose spectrum grid differs, the real and imaginary parts of ``A`` are
    sampled at the exact normalised frequency of every bin of the new grid by (bi/tri)linear interpolation
    (``grid_sample`` on the stored map with its zero frequency centred by ``fftshift``); frequencies beyond
    the stored range take the nearest stored value. So the zero frequency maps to the zero frequency, and a
    filter learnt to damp frequencies near the Nyquist limit keeps doing so at another resolution. At the
    reference size no interpolation takes place. The map in use for a size is :meth:`frequency_response`.

    The FFT runs in float32 (or float64 for float64 input): half-precision FFTs support only power-of-two
    sizes, so autocast inputs are upcast and the output is cast back to the input dtype. The block compiles with
    ``torch.jit.script`` (the bundles export their networks to TorchScript).

    Args:
        channels: number of feature channels ``C``; one complex map per channel.
        spatial_dims: number of spatial dimensions (2 or 3).
        spatial_size: reference spatial size at which ``A`` is stored; an int is used for every axis.
        init_value: initial value of every entry of ``A`` (default ``1 + 0j``, the identity filter).
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int,
        spatial_size: Sequence[int] | int,
        init_value: complex = 1.0 + 0.0j,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels}.")
        if isinstance(spatial_size, int):
            spatial_size = (spatial_size,) * spatial_dims
        spatial_size = tuple(int(s) for s in spatial_size)
        if len(spatial_size) != spatial_dims or any(s < 1 for s in spatial_size):
            raise ValueError(
                f"spatial_size must be a positive int or {spatial_dims} positive ints, got {spatial_size}."
            )
        self.channels = channels
        self.spatial_dims = spatial_dims
        self.spatial_size = spatial_size
        # the same sizes as a list: TorchScript indexes lists, not tuples, with a loop variable
        self.reference_size = list(spatial_size)
        init_value = complex(init_value)
        grid = rfft_grid_size(spatial_size)
        # real and imaginary parts stored side by side, (C, 2, *grid): interpolation treats them as 2C channels
        weight = torch.empty(channels, 2, *grid)
        weight[:, 0] = init_value.real
        weight[:, 1] = init_value.imag
        self.weight = nn.Parameter(weight)

    def frequency_response(self, spatial_size: list[int]) -> torch.Tensor:
        """The complex map ``A`` applied to an input of ``spatial_size``: shape ``(C, *rfft_grid_size(size))``.

        The stored map at the reference size, else the stored map sampled at the normalised frequency of every bin
        of the new grid (class docstring).
        """
        size = [int(s) for s in spatial_size]
        if len(size) != self.spatial_dims:
            raise ValueError(f"spatial_size must have {self.spatial_dims} entries, got {size}.")
        weight = self.weight
        if size != self.reference_size:
            weight = self._resample(weight, size)
        return torch.complex(weight[:, 0], weight[:, 1])

    def _resample(self, weight: torch.Tensor, spatial_size: list[int]) -> torch.Tensor:
        """Sample the stored ``(C, 2, *grid)`` map at the frequencies of the rfft grid of ``spatial_size``."""
        coords: list[torch.Tensor] = []
        last = self.spatial_dims - 1
        for axis in range(self.spatial_dims):
            n_src, n_dst = self.reference_size[axis], spatial_size[axis]
            if axis == last:  # halved axis: bin i holds frequency i / n
                freq = torch.fft.rfftfreq(n_dst, device=weight.device, dtype=weight.dtype)
                position, length = freq * n_src, n_src // 2 + 1
            else:  # full axis, sampled in the centred (fftshift) layout where index n // 2 is the zero frequency
                freq = torch.fft.fftfreq(n_dst, device=weight.device, dtype=weight.dtype)
                position, length = freq * n_src + n_src // 2, n_src
            position = position.clamp(0, length - 1)  # beyond the stored range: nearest stored frequency
            if length > 1:
                coords.append(position * (2.0 / (length - 1)) - 1.0)
            else:
                coords.append(torch.zeros_like(position))
        grids = torch.meshgrid(coords, indexing="ij")
        # grid_sample wants the coordinates of the last axis first
        sample_grid = torch.stack([grids[i] for i in range(last, -1, -1)], dim=-1).unsqueeze(0)
        full_axes = [2 + i for i in range(last)]
        source = torch.fft.fftshift(weight.reshape([1, 2 * self.channels] + list(weight.shape[2:])), dim=full_axes)
        sampled = F.grid_sample(source, sample_grid, mode="bilinear", padding_mode="border", align_corners=True)
        return sampled.reshape([self.channels, 2] + list(sampled.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``: filter each channel's spectrum by ``A``."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"FFParser expects (B, {self.channels}, <{self.spatial_dims} spatial dims>), got {list(x.shape)}."
            )
        spatial = x.shape[2:]
        axes = [2 + i for i in range(self.spatial_dims)]
        work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        spectrum = torch.fft.rfftn(x.to(work_dtype), dim=axes, norm="ortho")
        response = self.frequency_response(spatial).to(spectrum.dtype)
        filtered = torch.fft.irfftn(spectrum * response, s=spatial, dim=axes, norm="ortho")
        return filtered.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, spatial_dims={self.spatial_dims}, spatial_size={self.spatial_size}"
