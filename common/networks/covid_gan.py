"""3D inpainting GAN that turns a COVID-19 chest CT into a synthetic healthy one (pseudo-mask generator).

Shabani et al., "Self-supervised region-aware segmentation of COVID-19 CT images using 3D GAN and
contrastive learning", Computers in Biology and Medicine 2022. The generator ``G`` is trained with an
adversarial loss (healthy volumes real, ``G(covid)`` fake) and a denoising reconstruction loss
(``G(healthy + noise) ~ healthy``, noise from :func:`denoising_noise`); the pseudo-lesion mask is then
``input - G(input)`` inside the lungs (:func:`common.data.pseudo_masks.pseudo_mask`).

Volumes are ``(B, C, D, H, W)`` = ``(B, C, z, y, x)`` as produced by
:class:`common.data.chest_ct.LungPreprocessd` (default ``32 x 128 x 128``), intensities in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock

__all__ = ["InpaintingGenerator", "MultiScaleResidualBlock", "PatchDiscriminator3D", "denoising_noise", "fractal_noise"]


class MultiScaleResidualBlock(nn.Module):
    """Parallel convolutions of several kernel sizes whose outputs are added back to the input.

    ``y = x + sum_k act(norm(conv_k(x)))`` for ``k`` in ``kernel_sizes`` (default 1^3, 3^3, 5^3), "same"
    padding: ``(B, C, *spatial) -> (B, C, *spatial)``. The branches see 1, 3 and 5 voxel neighbourhoods at
    once, the multi-scale context the generator needs to replace a lesion by plausible parenchyma.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        kernel_sizes: odd kernel sizes of the branches. Default ``(1, 3, 5)``.
        norm: MONAI norm name. Default ``"instance"``.
        act: MONAI activation. Default LeakyReLU(0.2).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        norm: str | tuple = "instance",
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}),
    ) -> None:
        super().__init__()
        if not kernel_sizes or any(int(k) < 1 or int(k) % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty sequence of odd sizes, got {tuple(kernel_sizes)}")
        self.branches = nn.ModuleList(
            Convolution(spatial_dims, channels, channels, kernel_size=int(k), norm=norm, act=act, adn_ordering="NA")
            for k in kernel_sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for branch in self.branches:
            out = out + branch(x)
        return out


class InpaintingGenerator(nn.Module):
    """3D U-Net generator with bottleneck noise and a multi-scale residual block (Shabani et al. 2022).

    ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` in ``[0, 1]`` (sigmoid output, for inputs
    scaled to ``[0, 1]``). Every spatial size must be divisible by ``2 ** (len(channels) - 1)`` (16 with
    the default widths, e.g. 32 x 128 x 128).

    Layout, built from MONAI's DynUNet blocks: encoder level ``i`` is a ``UnetBasicBlock`` (two
    conv3-norm-act, the first with stride 2 from level 1 on) of width ``channels[i]``; at the bottleneck,
    uniform noise ``U[0, 1)`` of ``noise_channels`` channels is concatenated, mixed back to
    ``channels[-1]`` by a 1^3 convolution and passed through a :class:`MultiScaleResidualBlock`
    (``multiscale_kernels`` parallel branches added back); each decoder level is a ``UnetUpBlock``
    (transposed conv x2, skip concatenation, ``UnetBasicBlock``); a 1^3 convolution and a sigmoid give
    the output. The noise is what makes the inpainting stochastic, as in the paper's GAN.

    Args:
        in_channels: input channels. Default 1.
        out_channels: output channels. Default 1.
        channels: widths per level, the last one is the bottleneck. Default ``(8, 16, 32, 64, 128)``
            (the paper's).
        noise_channels: channels of bottleneck noise; 0 disables the noise. Default 16.
        multiscale_kernels: kernel sizes of the multi-scale residual block. Default ``(1, 3, 5)``.
        norm: MONAI norm name. Default ``"instance"`` (batches of 5 volumes are too small for batch norm).
        act: MONAI activation. Default LeakyReLU(0.2).
        spatial_dims: 3 (volumes, the method's setting) or 2.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
        noise_channels: int = 16,
        multiscale_kernels: Sequence[int] = (1, 3, 5),
        norm: str | tuple = "instance",
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels needs at least 2 positive widths, got {tuple(channels)}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if noise_channels < 0:
            raise ValueError(f"noise_channels must be >= 0, got {noise_channels}")
        chans = [int(c) for c in channels]
        self.spatial_dims = spatial_dims
        self.noise_channels = noise_channels
        self.divisor = 2 ** (len(chans) - 1)
        self.encoder = nn.ModuleList(
            UnetBasicBlock(spatial_dims, in_channels if i == 0 else chans[i - 1], c, 3, 1 if i == 0 else 2, norm, act)
            for i, c in enumerate(chans)
        )
        self.noise_fusion = Convolution(
            spatial_dims, chans[-1] + noise_channels, chans[-1], kernel_size=1, norm=norm, act=act, adn_ordering="NA"
        )
        self.multiscale = MultiScaleResidualBlock(spatial_dims, chans[-1], multiscale_kernels, norm, act)
        self.decoder = nn.ModuleList(
            UnetUpBlock(spatial_dims, chans[i + 1], chans[i], 3, 1, 2, norm, act)
            for i in reversed(range(len(chans) - 1))
        )
        self.head = UnetOutBlock(spatial_dims, chans[0], out_channels)

    def noise_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the ``noise`` argument for an input of shape ``(B, C, *spatial)``."""
        b, spatial = int(input_shape[0]), [int(s) for s in input_shape[2:]]
        return (b, self.noise_channels, *(s // self.divisor for s in spatial))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Inpaint ``x`` ``(B, C_in, *spatial)``; ``noise`` of :meth:`noise_shape` (default ``torch.rand``)."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D input (B, C, *spatial), got shape {tuple(x.shape)}")
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor} (2 ** (levels - 1))"
            )
        expected = self.noise_shape(x.shape)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        if self.noise_channels:
            if noise is None:
                noise = torch.rand(expected, device=x.device, dtype=x.dtype)
            elif tuple(noise.shape) != expected:
                raise ValueError(f"noise must have shape {expected}, got {tuple(noise.shape)}")
            x = torch.cat([x, noise.to(x)], dim=1)
        elif noise is not None:
            raise ValueError("noise given but the generator was built with noise_channels=0")
        x = self.multiscale(self.noise_fusion(x))
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = block(x, skip)
        return torch.sigmoid(self.head(x))


class PatchDiscriminator3D(nn.Module):
    """Small CNN telling healthy CT volumes (real) from generated ones (fake), one logit per patch.

    ``(B, in_channels, D, H, W) -> (B, 1, D / 2**n, H / 2**n, W / 2**n)`` logits, ``n = len(channels)``
    (``(B, C, H, W) -> (B, 1, H / 2**n, W / 2**n)`` with ``spatial_dims=2``, for the 2D generator):
    ``n`` stride-2 convolutions (kernel 4, LeakyReLU 0.2, instance norm from the second on) and a final
    3^3 convolution to one channel. Use with ``BCEWithLogitsLoss`` against ones (real) or zeros (fake);
    average the map for a per-volume score. MONAI's ``PatchDiscriminator`` was not reused because it
    returns the list of all intermediate feature maps (for feature matching), which this method does not
    use; a plain logits tensor plugs directly into MONAI's ``GanTrainer`` loss functions.

    Args:
        in_channels: input channels. Default 1.
        channels: widths of the strided convolutions. Default ``(16, 32, 64, 128)``.
        norm: MONAI norm name. Default ``"instance"``.
        act: MONAI activation. Default LeakyReLU(0.2).
        spatial_dims: 3 (volumes, the method's setting; the class keeps its name) or 2, as
            :class:`InpaintingGenerator`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str | tuple = "instance",
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1 or not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"need in_channels >= 1 and positive channels, got {in_channels}, {tuple(channels)}")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            layers.append(
                Convolution(
                    spatial_dims,
                    prev,
                    int(c),
                    strides=2,
                    kernel_size=4,
                    padding=1,
                    norm=None if i == 0 else norm,
                    act=act,
                    adn_ordering="NA",
                )
            )
            prev = int(c)
        layers.append(Convolution(spatial_dims, prev, 1, kernel_size=3, conv_only=True))
        self.net = nn.Sequential(*layers)
        self.spatial_dims = spatial_dims
        self.min_size = 2 ** len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D input (B, C, *spatial), got shape {tuple(x.shape)}")
        if any(s < self.min_size for s in x.shape[2:]):
            raise ValueError(
                f"every spatial size must be >= {self.min_size} (2 ** len(channels)), got {tuple(x.shape[2:])}"
            )
        return self.net(x)


def fractal_noise(
    num: int,
    size: Sequence[int],
    octaves: int = 4,
    base_resolution: int = 4,
    persistence: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Smooth fractal value noise ("Perlin-like"), ``-> (num, H, W)`` in ``[-1, 1]``.

    Octave ``o`` is a random grid of ``base_resolution * 2**o`` values in ``U[-1, 1]`` upsampled bicubically
    to ``size``, weighted by ``persistence**o``; the sum is divided by its largest absolute value. Value
    noise rather than gradient (Perlin) noise: same smooth multi-scale blobs, a few lines of code.
    """
    if octaves < 1 or base_resolution < 1 or not 0 < persistence <= 1:
        raise ValueError("need octaves >= 1, base_resolution >= 1 and 0 < persistence <= 1")
    h, w = (int(s) for s in size)
    total = torch.zeros(num, 1, h, w, device=device)
    for o in range(octaves):
        res = base_resolution * 2**o
        grid = torch.rand(num, 1, res, res, generator=generator, device=generator.device if generator else device)
        layer = F.interpolate(grid.to(total.device) * 2 - 1, size=(h, w), mode="bicubic", align_corners=True)
        total += persistence**o * layer
    total = total[:, 0]
    return total / total.flatten(1).abs().amax(dim=1).clamp_min(1e-8)[:, None, None]


def denoising_noise(
    volume: torch.Tensor,
    generator: torch.Generator | None = None,
    slice_fraction: float = 0.25,
    amplitude: float = 0.3,
    octaves: int = 4,
    base_resolution: int = 4,
    foreground_only: bool = True,
) -> torch.Tensor:
    """Corrupt healthy volumes with fractal noise on random axial slices, for the denoising loss.

    ``(B, C, D, H, W) -> (B, C, D, H, W)``: in each volume, ``max(1, round(slice_fraction * D))`` distinct
    random slices along ``D`` (axial, z) get ``amplitude * fractal_noise`` added (the same map for all
    channels); ``foreground_only`` restricts it to voxels > 0 (the lungs of a lung-masked volume), and the
    result is clamped to ``[0, 1]``. The generator is then trained to map the corrupted volume back to the
    clean one (e.g. ``L1(G(denoising_noise(x)), x)``).

    Args:
        volume: healthy volumes in ``[0, 1]``.
        generator: ``torch.Generator`` for reproducible noise (on the volume's device); global RNG if None.
        slice_fraction: fraction of slices corrupted per volume, in ``(0, 1]``. Default 0.25.
        amplitude: peak noise amplitude. Default 0.3.
        octaves, base_resolution: see :func:`fractal_noise`.
        foreground_only: add noise only where ``volume > 0``. Default True.
    """
    if volume.dim() != 5:
        raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(volume.shape)}")
    if not 0 < slice_fraction <= 1 or amplitude < 0:
        raise ValueError(f"need 0 < slice_fraction <= 1 and amplitude >= 0, got {slice_fraction}, {amplitude}")
    b, _, d, h, w = volume.shape
    k = max(1, round(slice_fraction * d))
    noise = torch.zeros(b, 1, d, h, w, device=volume.device, dtype=volume.dtype)
    maps = fractal_noise(b * k, (h, w), octaves, base_resolution, generator=generator, device=volume.device)
    maps = maps.to(volume.dtype).view(b, k, h, w)
    for i in range(b):
        slices = torch.randperm(d, generator=generator, device=generator.device if generator else "cpu")[:k]
        noise[i, 0, slices.to(volume.device)] = maps[i]
    noise = amplitude * noise
    if foreground_only:
        noise = noise * (volume > 0)
    return (volume + noise).clamp(0.0, 1.0)
