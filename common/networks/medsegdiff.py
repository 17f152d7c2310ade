"""MedSegDiff: the noise-prediction network of diffusion-based segmentation, 2D and 3D.

Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic Model", MIDL 2023
(arXiv 2211.00611). The network predicts the noise added to a segmentation mask, conditioned on the image:

    eps_theta(x_t, I, t) = D((E^I + E^x), t)

with a condition encoder ``E^I`` on the raw image ``I``, a segmentation encoder ``E^x`` on the noisy mask
``x_t`` and a decoder ``D``. Two mechanisms couple the encoders at every stage ``k``:

- FF-Parser (paper section "FF-Parser"): the noisy-mask features ``m_x^k`` are filtered in Fourier space by a learnable
  complex map (:class:`~common.networks.blocks.ff_parser.FFParser`);
- dynamic conditional encoding (paper section "Dynamic Conditional Encoding"), the attentive fusion
  ``A(m_I^k, m_x^k) = (LayerNorm(m_I^k) * LayerNorm(m_x^k)) * m_I^k`` (:class:`AttentiveFusion`).

The network only predicts the noise; the diffusion maths belong to MONAI's schedulers
(``monai.networks.schedulers.DDPMScheduler``/``DDIMScheduler``) and ``monai.inferers.DiffusionInferer``,
whose calling convention ``net(x=noisy_mask, timesteps=t, context=image)`` :class:`MedSegDiff` follows
(use ``mode="crossattn"``, which passes the image through ``context`` untouched).

Departures from the official code, on purpose (its defects): the LayerNorm fusion is actually applied,
no module is created inside ``forward``, the FF-Parser accepts any input size, and 3D and multi-channel
masks are supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, MLPBlock, SABlock, UpSample
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from common.networks.blocks.checkpointing import checkpoint_stage
from common.networks.blocks.ff_parser import FFParser

__all__ = [
    "AttentiveFusion",
    "ChannelLayerNorm",
    "DeterministicMedSegDiff",
    "MedSegDiff",
    "SpatialTransformer",
    "TimeConditionedResBlock",
    "TimeConditionedStage",
]

TIME_INJECTIONS = ("add", "scale_shift")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a feature map, at every voxel: ``(B, C, *spatial) -> (B, C, *spatial)``.

    ``torch.nn.LayerNorm`` normalises trailing axes; MedSegDiff's fusion normalises channels, so the channel
    axis is moved last, normalised with a learnable per-channel affine (initialised to the identity), and moved back.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class AttentiveFusion(nn.Module):
    """Dynamic conditional encoding of MedSegDiff (paper section "Dynamic Conditional Encoding"), at one stage.

    ``A(m_I, m_x) = (LayerNorm(m_I) * LayerNorm(m_x)) * m_I``, elementwise, with LayerNorm over channels at each
    voxel (separate learnable affines for the two inputs, initialised to weight 1 and bias 0, so at initialisation
    ``A`` equals the plain equation). ``LayerNorm(m_I) * LayerNorm(m_x)`` is a per-voxel, per-channel gate that is
    large where image and mask features agree; it re-weights the condition features ``m_I``.

    Where the result goes: with ``residual=False`` (default) the condition stream continues as ``A(m_I, m_x)``, the
    paper's equation as written; with ``residual=True`` it continues as ``m_I + A(m_I, m_x) = (1 + gate) * m_I``, an
    identity path around the multiplicative gate (an option; the MedSegDiff bundle's model card compares the two).

    Args:
        channels: number of channels ``C`` of both inputs.
        residual: add ``A`` to ``m_I`` instead of replacing ``m_I`` by ``A`` (default False, the paper).

    Shapes: ``m_I, m_x: (B, C, *spatial) -> (B, C, *spatial)``.
    """

    def __init__(self, channels: int, residual: bool = False) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels}.")
        self.residual = residual
        self.norm_image = ChannelLayerNorm(channels)
        self.norm_mask = ChannelLayerNorm(channels)

    def attention(self, m_image: torch.Tensor, m_mask: torch.Tensor) -> torch.Tensor:
        """The paper's ``A(m_I, m_x)`` alone."""
        return self.norm_image(m_image) * self.norm_mask(m_mask) * m_image

    def forward(self, m_image: torch.Tensor, m_mask: torch.Tensor) -> torch.Tensor:
        if m_image.shape != m_mask.shape:
            raise ValueError(
                f"condition and mask features must have the same shape, got {list(m_image.shape)} "
                f"and {list(m_mask.shape)}."
            )
        fused = self.attention(m_image, m_mask)
        return m_image + fused if self.residual else fused


class TimeConditionedResBlock(nn.Module):
    """Residual block ``(conv-GroupNorm-SiLU) x 2`` with the time embedding injected after the first GroupNorm.

    ``h = SiLU(inject(GN(conv(x)), t)); h = SiLU(GN(conv(dropout(h)))); out = h + skip(x)`` where ``skip`` is a
    1x1 convolution when the channel count changes. ``inject`` is ``h + Linear(SiLU(t))`` for ``"add"`` and the
    adaptive group norm ``h * (1 + scale) + shift``, ``(scale, shift) = Linear(SiLU(t))``, for ``"scale_shift"``.
    The injection follows the normalisation so that GroupNorm cannot remove it. MONAI's
    ``DiffusionUNetResnetBlock`` is pre-activation (norm-act-conv) and additive only, hence this block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        time_embed_dim: size of the time embedding vector.
        norm_num_groups: groups of the GroupNorms (must divide ``out_channels``).
        time_injection: ``"add"`` or ``"scale_shift"``.
        dropout: dropout probability between the two convolutions.

    Shapes: ``x: (B, in_channels, *spatial)``, ``temb: (B, time_embed_dim) -> (B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        norm_num_groups: int,
        time_injection: str = "scale_shift",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if time_injection not in TIME_INJECTIONS:
            raise ValueError(f"time_injection must be one of {TIME_INJECTIONS}, got {time_injection!r}.")
        if out_channels % norm_num_groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by norm_num_groups ({norm_num_groups}).")
        self.time_injection = time_injection
        self.scale_shift = time_injection == "scale_shift"
        self.out_channels = out_channels
        self.conv1 = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, conv_only=True)
        self.norm1 = nn.GroupNorm(norm_num_groups, out_channels)
        self.time_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(time_embed_dim, out_channels * (2 if time_injection == "scale_shift" else 1))
        )
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, conv_only=True)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.skip: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, conv_only=True)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        t = self.time_proj(temb)
        for _ in range(x.dim() - 2):  # (B, C') -> (B, C', 1, ..., 1), broadcast over the spatial axes
            t = t.unsqueeze(-1)
        if self.scale_shift:
            h = h * (1 + t[:, : self.out_channels]) + t[:, self.out_channels :]
        else:
            h = h + t
        h = self.dropout(self.act(h))
        h = self.act(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class SpatialTransformer(nn.Module):
    """Self-attention over all voxels of a feature map: ``(B, C, *spatial) -> (B, C, *spatial)``.

    The map is flattened to ``(B, N, C)`` tokens; then ``x = x + MHA(LayerNorm(x))`` and
    ``x = x + FF(LayerNorm(x))`` with MONAI's ``SABlock`` (multi-head self-attention through
    ``scaled_dot_product_attention``) and ``MLPBlock`` (``C -> mlp_ratio * C -> C``, GELU); then reshaped back.
    MONAI's ``TransformerBlock`` computes the same but always creates a cross-attention LayerNorm that never gets a
    gradient, which breaks ``DistributedDataParallel`` unless ``find_unused_parameters=True``; hence this block.
    """

    def __init__(self, channels: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        self.norm1 = nn.LayerNorm(channels)
        self.attn = SABlock(channels, num_heads, dropout_rate=dropout, qkv_bias=True, use_flash_attention=True)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = MLPBlock(channels, mlp_ratio * channels, dropout_rate=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # b c *s -> b (*s) c
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(x.shape)


class TimeConditionedStage(nn.Module):
    """``num_blocks`` x (:class:`TimeConditionedResBlock`, then :class:`SpatialTransformer` if ``attention``).

    Shapes: ``(B, in_channels, *spatial), (B, time_embed_dim) -> (B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        time_embed_dim: int,
        norm_num_groups: int,
        time_injection: str,
        dropout: float,
        attention: bool,
        num_heads: int,
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(
            TimeConditionedResBlock(
                spatial_dims,
                in_channels if i == 0 else out_channels,
                out_channels,
                time_embed_dim,
                norm_num_groups,
                time_injection,
                dropout,
            )
            for i in range(num_blocks)
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_channels, num_heads, dropout=dropout) if attention else nn.Identity()
            for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for res_block, attention in zip(self.res_blocks, self.attentions):
            x = attention(res_block(x, temb))
        return x


def _downsample(spatial_dims: int, channels: int) -> nn.Module:
    """Strided 3x3 convolution: halves every spatial size, keeps the channels."""
    return Convolution(spatial_dims, channels, channels, strides=2, kernel_size=3, conv_only=True)


class MedSegDiff(nn.Module):
    """MedSegDiff noise predictor ``eps_theta(x_t, I, t) = D((E^I + E^x), t)`` (Wu et al., MIDL 2023), 2D or 3D.

    Layout, with ``L = len(channels)`` levels (the ``L - 1`` levels above the deepest one halve the size):

    - Time: ``get_timestep_embedding(t, channels[0])`` -> Linear -> SiLU -> Linear (``4 * channels[0]``), injected
      into every residual block of both encoders, the bottleneck and the decoder.
    - Two encoders of identical layout and separate weights: the condition encoder ``E^I`` on the image
      ``context`` and the segmentation encoder ``E^x`` on the noisy mask ``x``. Each starts with a 3x3 convolution
      to ``channels[0]``; level ``k`` is ``num_res_blocks`` x (:class:`TimeConditionedResBlock` to ``channels[k]``,
      then :class:`SpatialTransformer` if ``attention_levels[k]``), followed (except at the deepest level) by a
      strided 3x3 convolution.
    - At the end of level ``k`` (before downsampling): the mask features pass through an
      :class:`~common.networks.blocks.ff_parser.FFParser` if ``ff_parser_levels[k]`` (``m_x^k <- FFParser(m_x^k)``),
      then the condition stream is fused, ``m_I^k <- A(m_I^k, m_x^k)`` (:class:`AttentiveFusion`; with
      ``fusion_residual=True``, ``m_I^k <- m_I^k + A(m_I^k, m_x^k)``). Both updated streams continue to level ``k + 1``.
    - Bottleneck: the deepest features are added, ``h = m_I^{L-1} + m_x^{L-1}`` (the paper's ``E^I + E^x``), then
      residual block, attention (if ``attention_levels[-1]``), residual block.
    - Decoder ``D``: for ``k = L-2 .. 0``: nearest x2 upsampling + 3x3 convolution to ``channels[k]``,
      concatenation with the skip ``m_I^k + m_x^k`` (the two encoders' level-``k`` outputs added, as at the
      bottleneck), then a stage like the encoder's. Head: GroupNorm -> SiLU -> 3x3 convolution to ``out_channels``.

    Shapes: ``x: (B, out_channels, *spatial)``, ``timesteps: (B,)`` or ``(1,)`` (broadcast over the batch, as
    ``DiffusionInferer.sample`` passes it), ``context: (B, in_channels, *spatial) -> (B, out_channels, *spatial)``,
    the predicted noise. Every spatial size must be divisible by ``2 ** (len(channels) - 1)``.

    Single-tensor (export) signature: ``forward(x)`` with ``x: (B, in_channels + out_channels, *spatial)`` holding
    the concatenation ``[image, noisy mask]`` (image channels first) and ``timesteps`` omitted, which means
    ``t = 0`` (the last denoising step). MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``) call a network
    with one tensor; this signature makes the network checkable and exportable as is. Samplers always pass
    ``(x, timesteps, context)``. ``timesteps`` may also be omitted alone (``t = 0``) with an explicit ``context``.
    The network compiles with ``torch.jit.script``.

    Args:
        spatial_dims: 2 (default; axial slices with the MRI modalities as channels) or 3.
        in_channels: image channels (default 4: the four BraTS MRI modalities).
        out_channels: mask channels, also the predicted-noise channels (default 1 for a binary mask, e.g. whole
            tumour; 3 for the overlapping TC/WT/ET regions).
        channels: feature channels per level (default ``(32, 64, 128, 256)``), each divisible by ``norm_num_groups``.
        num_res_blocks: residual blocks per level in each encoder and in the decoder (default 1).
        attention_levels: per level, whether the residual blocks are followed by self-attention
            (default ``(False, False, True, True)``; same length as ``channels``).
        num_heads: attention heads (default 4); must divide ``channels[k]`` at attention levels.
        ff_parser_levels: per level, whether the mask features pass an FF-Parser (default ``None``: every level).
        ff_parser_size: reference input spatial size (int or one per axis, default 64) at which the FF-Parser maps
            are stored: level ``k`` stores maps for ``ff_parser_size // 2**k``. Inputs of another size use resampled
            maps (see :class:`~common.networks.blocks.ff_parser.FFParser`); set it to the training patch size.
        norm_num_groups: groups of every GroupNorm (default 32).
        time_injection: ``"scale_shift"`` (default, adaptive group norm) or ``"add"``.
        dropout: dropout probability in the residual and attention blocks (default 0.0).
        fusion_residual: condition stream continues as ``A`` (default False, the paper) or as ``m_I + A`` (see
            :class:`AttentiveFusion`).
        gradient_checkpointing: in training, recompute the two encoders' stage activations in the backward pass
            instead of storing them (:func:`~common.networks.blocks.checkpointing.checkpoint_stage`): less memory for
            large batches or 3D inputs, for about one more encoder forward per step; same outputs (default False).

    Example (training step and 50-step DDIM sampling with MONAI)::

        net = MedSegDiff(spatial_dims=2, in_channels=4, out_channels=1, ff_parser_size=256)
        inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=1000))
        noise = torch.randn_like(mask)  # mask in [-1, 1], (B, 1, 256, 256); image (B, 4, 256, 256)
        t = torch.randint(0, 1000, (mask.shape[0],), device=mask.device)
        pred = inferer(inputs=mask, diffusion_model=net, noise=noise, timesteps=t, condition=image, mode="crossattn")
        loss = F.mse_loss(pred, noise)
        ddim = DDIMScheduler(num_train_timesteps=1000)
        ddim.set_timesteps(50)
        sample = inferer.sample(torch.randn_like(mask), net, ddim, conditioning=image, mode="crossattn")
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 4,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, False, True, True),
        num_heads: int = 4,
        ff_parser_levels: Sequence[bool] | None = None,
        ff_parser_size: Sequence[int] | int = 64,
        norm_num_groups: int = 32,
        time_injection: str = "scale_shift",
        dropout: float = 0.0,
        fusion_residual: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        levels = len(channels)
        ff_parser_levels = (True,) * levels if ff_parser_levels is None else tuple(bool(f) for f in ff_parser_levels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels} and {out_channels}.")
        if levels < 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must hold at least two positive ints (levels), got {channels}.")
        if norm_num_groups < 1 or any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every entry of channels {channels} must be divisible by norm_num_groups={norm_num_groups}."
            )
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}.")
        if len(attention_levels) != levels:
            raise ValueError(f"attention_levels needs one flag per level ({levels}), got {len(attention_levels)}.")
        if len(ff_parser_levels) != levels:
            raise ValueError(f"ff_parser_levels needs one flag per level ({levels}), got {len(ff_parser_levels)}.")
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        for c, attend in zip(channels, attention_levels):
            if attend and c % num_heads:
                raise ValueError(f"channels {c} at an attention level is not divisible by num_heads={num_heads}.")
        if time_injection not in TIME_INJECTIONS:
            raise ValueError(f"time_injection must be one of {TIME_INJECTIONS}, got {time_injection!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        factor = 2 ** (levels - 1)
        ff_size = (ff_parser_size,) * spatial_dims if isinstance(ff_parser_size, int) else tuple(ff_parser_size)
        if len(ff_size) != spatial_dims or any(int(s) < 1 or int(s) % factor for s in ff_size):
            raise ValueError(
                f"ff_parser_size must be an int or {spatial_dims} ints, each positive and divisible by {factor}, "
                f"got {ff_parser_size}."
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.size_divisor = factor
        self.gradient_checkpointing = bool(gradient_checkpointing)

        self.time_embed_base = channels[0]
        time_embed_dim = 4 * channels[0]
        self.time_embed = nn.Sequential(
            nn.Linear(channels[0], time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        def stage(c_in: int, c_out: int, level: int) -> TimeConditionedStage:
            return TimeConditionedStage(
                spatial_dims,
                c_in,
                c_out,
                num_res_blocks,
                time_embed_dim,
                norm_num_groups,
                time_injection,
                dropout,
                attention_levels[level],
                num_heads,
            )

        # condition encoder E^I and segmentation encoder E^x: same layout, separate weights
        self.image_stem = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, conv_only=True)
        self.mask_stem = Convolution(spatial_dims, out_channels, channels[0], kernel_size=3, conv_only=True)
        previous = (channels[0], *channels[:-1])
        self.image_stages = nn.ModuleList(stage(previous[k], channels[k], k) for k in range(levels))
        self.mask_stages = nn.ModuleList(stage(previous[k], channels[k], k) for k in range(levels))
        # one entry per level so that the encoder loop zips equal-length lists; the deepest level does not downsample
        self.image_downs = nn.ModuleList(
            _downsample(spatial_dims, channels[k]) if k < levels - 1 else nn.Identity() for k in range(levels)
        )
        self.mask_downs = nn.ModuleList(
            _downsample(spatial_dims, channels[k]) if k < levels - 1 else nn.Identity() for k in range(levels)
        )
        self.ff_parsers = nn.ModuleList(
            FFParser(channels[k], spatial_dims, tuple(int(s) // 2**k for s in ff_size))
            if ff_parser_levels[k]
            else nn.Identity()
            for k in range(levels)
        )
        self.fusions = nn.ModuleList(AttentiveFusion(channels[k], residual=fusion_residual) for k in range(levels))

        # bottleneck on E^I + E^x: residual block, attention, residual block
        self.middle_block1 = TimeConditionedResBlock(
            spatial_dims, channels[-1], channels[-1], time_embed_dim, norm_num_groups, time_injection, dropout
        )
        self.middle_attention: nn.Module = (
            SpatialTransformer(channels[-1], num_heads, dropout=dropout) if attention_levels[-1] else nn.Identity()
        )
        self.middle_block2 = TimeConditionedResBlock(
            spatial_dims, channels[-1], channels[-1], time_embed_dim, norm_num_groups, time_injection, dropout
        )

        # decoder D, deepest first: ups[i] and decoder_stages[i] serve level k = levels - 2 - i
        self.ups = nn.ModuleList(
            UpSample(
                spatial_dims,
                channels[k + 1],
                channels[k + 1],
                scale_factor=2,
                mode="nontrainable",
                pre_conv=None,
                interp_mode="nearest",
                align_corners=None,
                post_conv=Convolution(spatial_dims, channels[k + 1], channels[k], kernel_size=3, conv_only=True),
            )
            for k in reversed(range(levels - 1))
        )
        self.decoder_stages = nn.ModuleList(stage(2 * channels[k], channels[k], k) for k in reversed(range(levels - 1)))
        self.head = nn.Sequential(
            nn.GroupNorm(norm_num_groups, channels[0]),
            nn.SiLU(),
            Convolution(spatial_dims, channels[0], out_channels, kernel_size=3, conv_only=True),
        )

    def _split_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor | None, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate shapes; return ``(noisy mask, timesteps as (B,), image)``, unpacking the single-tensor form."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"x (the noisy mask) must be (B, {self.out_channels}, <{self.spatial_dims} spatial dims>), "
                f"got {list(x.shape)}."
            )
        if context is None:
            if x.shape[1] != self.in_channels + self.out_channels:
                raise ValueError(
                    f"MedSegDiff needs the image as context (B, {self.in_channels}, *spatial), or, without context, "
                    f"x must be the concatenation [image, noisy mask] with {self.in_channels} + {self.out_channels} "
                    f"channels; got x of shape {list(x.shape)}. With DiffusionInferer pass condition=image / "
                    "conditioning=image and mode='crossattn'."
                )
            context = x[:, : self.in_channels]
            x = x[:, self.in_channels :]
        if x.shape[1] != self.out_channels:
            raise ValueError(
                f"x (the noisy mask) must be (B, {self.out_channels}, <{self.spatial_dims} spatial dims>), "
                f"got {list(x.shape)}."
            )
        spatial = x.shape[2:]
        for size in spatial:
            if size % self.size_divisor != 0:
                raise ValueError(
                    f"every spatial size must be divisible by 2**(len(channels)-1) = {self.size_divisor}, got "
                    f"{spatial}; pad or crop the input (e.g. monai.transforms.DivisiblePad)."
                )
        if context.dim() != x.dim() or context.shape[1] != self.in_channels or context.shape[2:] != spatial:
            raise ValueError(
                f"context (the image) must be (B, {self.in_channels}, {spatial}), got {list(context.shape)}."
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"x and context batch sizes differ: {x.shape[0]} and {context.shape[0]}.")
        if timesteps is None:
            timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        timesteps = timesteps.to(x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.numel() != x.shape[0]:
            raise ValueError(f"timesteps must hold 1 or B={x.shape[0]} values, got {timesteps.numel()}.")
        return x, timesteps, context

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise added to the mask.

        ``x (B, out_channels, *S), timesteps (B,) or (1,), context (B, in_channels, *S) -> (B, out_channels, *S)``;
        or ``x (B, in_channels + out_channels, *S)`` alone = ``[image, noisy mask]`` at ``t = 0`` (class docstring).
        """
        x, timesteps, context = self._split_inputs(x, timesteps, context)
        temb = get_timestep_embedding(timesteps, self.time_embed_base).to(x.dtype)
        temb = self.time_embed(temb)

        m_image = self.image_stem(context)
        m_mask = self.mask_stem(x)
        skips: list[torch.Tensor] = []
        last = len(self.channels) - 1
        for k, (image_stage, mask_stage, ff_parser, fusion, image_down, mask_down) in enumerate(
            zip(self.image_stages, self.mask_stages, self.ff_parsers, self.fusions, self.image_downs, self.mask_downs)
        ):
            if not torch.jit.is_scripting() and self.gradient_checkpointing and self.training:
                m_image = checkpoint_stage(image_stage, m_image, temb)
                m_mask = ff_parser(checkpoint_stage(mask_stage, m_mask, temb))
            else:
                m_image = image_stage(m_image, temb)
                m_mask = ff_parser(mask_stage(m_mask, temb))
            m_image = fusion(m_image, m_mask)
            if k < last:
                skips.append(m_image + m_mask)
                m_image = image_down(m_image)
                m_mask = mask_down(m_mask)

        h = m_image + m_mask
        h = self.middle_block2(self.middle_attention(self.middle_block1(h, temb)), temb)

        for up, decoder_stage in zip(self.ups, self.decoder_stages):
            h = decoder_stage(torch.cat([up(h), skips.pop()], dim=1), temb)
        return self.head(h)


class DeterministicMedSegDiff(nn.Module):
    """The MedSegDiff network as a plain segmentation network: the same backbone, one forward pass, no diffusion.

    ``forward(image) = MedSegDiff(x=0, timesteps=timestep, context=image)``: the noisy-mask input is zeroed and the
    timestep fixed, and the output is read as mask logits ``(B, out_channels, *S)`` (train it with e.g. MONAI's
    ``DiceCELoss(sigmoid=True)``; the mask is ``sigmoid(logits) > 0.5``). Every module of :class:`MedSegDiff` is there
    and trained, with the same parameter count: the condition encoder, the fusions and FF-Parsers, the bottleneck and
    the decoder do the work; the segmentation encoder sees a constant input, so its features (and hence the fusion
    gates ``LayerNorm(m_x)``) become learned per-channel constants, as do the time-embedding scale/shift terms. This
    is the control of "does diffusion beat a deterministic network with the same backbone?" (the MedSegDiff
    bundle's benchmark).

    Args:
        timestep: the fixed diffusion timestep given to the backbone (default 0).
        kwargs: the arguments of :class:`MedSegDiff` (``spatial_dims``, ``in_channels``, ``out_channels``, ...).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(self, timestep: int = 0, **kwargs) -> None:
        super().__init__()
        if timestep < 0:
            raise ValueError(f"timestep must be non-negative, got {timestep}.")
        self.timestep = int(timestep)
        self.backbone = MedSegDiff(**kwargs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        if image.dim() != backbone.spatial_dims + 2 or image.shape[1] != backbone.in_channels:
            raise ValueError(
                f"image must be (B, {backbone.in_channels}, <{backbone.spatial_dims} spatial dims>), "
                f"got {list(image.shape)}."
            )
        mask = image.new_zeros(image.shape[0], backbone.out_channels, *image.shape[2:])
        timesteps = torch.full((image.shape[0],), self.timestep, dtype=torch.long, device=image.device)
        return backbone(mask, timesteps=timesteps, context=image)
