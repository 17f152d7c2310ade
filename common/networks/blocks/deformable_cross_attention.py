"""Deformable cross feature blend (DCFB) block of DC2Fusion and its pieces.

L. Liu, X. Fan, C. Zhang, J. Dai, Y. Xie, X. Liang, "Three-Dimensional Medical Image Fusion with Deformable
Cross-Attention", ICONIP 2023 (arXiv 2310.06291); the method is known by its code name DC2Fusion. One block lets
a *query* stream ``x`` (e.g. MRI features) gather information from the *other* stream ``y`` (e.g. PET features) of
the same encoder stage:

1. :class:`OffsetNetwork` predicts a bounded displacement per voxel from ``cat(x, y)``;
2. :func:`deformable_sample` resamples ``y`` at the reference grid plus those displacements;
3. window cross-attention (the collection's one windowed attention,
   :class:`~common.networks.blocks.window_attention.LocalWindowCrossAttention`, with one query and one context
   group) attends from ``x`` (queries) to the sampled ``y`` (keys, values) in non-overlapping 3D windows;
4. :class:`CrossConvolutionBranch` convolves ``x`` with the sampled ``y``;
5. :class:`ChannelInteraction` / :class:`SpatialInteraction` exchange gates between the two branches
   (the bidirectional interaction of MixFormer, Chen et al., CVPR 2022), which are then concatenated and
   projected (:class:`DeformableCrossFeatureBlendBlock`).

All blocks are 3D. Feature maps travel between blocks channel-first ``(B, C, D, H, W)``; the norms, gates and
the MLP work channel-last ``(B, D, H, W, C)``, and every switch between the two layouts is an explicit
``permute`` (the public code reshapes channel-first memory into channel-last shapes, scrambling features).

Everything here compiles with ``torch.jit.script`` (the bundles export to TorchScript), which is why reshapes are
written with ``reshape``/``permute`` rather than einops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.mlp import MLPBlock
from monai.networks.layers.drop_path import DropPath
from monai.networks.layers.utils import get_norm_layer

from common.networks.blocks.window_attention import LocalWindowCrossAttention

__all__ = [
    "deformable_sample",
    "OffsetNetwork",
    "CrossConvolutionBranch",
    "ChannelInteraction",
    "SpatialInteraction",
    "DeformableCrossFeatureBlendBlock",
]

_PADDING_MODES = ("zeros", "border", "reflection")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, D, H, W, C)`` by permutation (never by reshape)."""
    return x.permute(0, 2, 3, 4, 1)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, H, W, C) -> (B, C, D, H, W)`` by permutation (never by reshape)."""
    return x.permute(0, 4, 1, 2, 3)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")


def deformable_sample(y: torch.Tensor, offsets: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Resample ``y`` at the voxel grid displaced by ``offsets`` (trilinear, ``align_corners=True``).

    ``out[b, :, d, h, w] = y[b, :, d + offsets[b, 0, d, h, w], h + offsets[b, 1, d, h, w], w + offsets[b, 2, d, h, w]]``

    Offsets are in voxels of ``y`` and ordered like the tensor axes, ``(dD, dH, dW)``. ``grid_sample`` reads
    the last axis of its grid as ``(x, y, z) = (W, H, D)``, so the normalised coordinates are reversed before
    sampling; the public DC2Fusion code builds the grid in ``(D, H, W)`` order, which only coincides for cubic
    inputs. With ``align_corners=True`` voxel index ``i`` of an axis of size ``n`` maps to ``2 i / (n - 1) - 1``
    (a singleton axis maps to 0), so zero offsets reproduce ``y`` up to float rounding.

    MONAI's :class:`~monai.networks.blocks.Warp` does the same resampling but caches its grid per shape and
    warns at construction when the compiled extension is missing; the few lines here keep the axis order
    explicit and testable.

    Args:
        y: features to resample, ``(B, C, D, H, W)``.
        offsets: displacements in voxels, ``(B, 3, D, H, W)``, channel order ``(D, H, W)``.
        padding_mode: ``grid_sample`` handling of samples outside the volume: ``"border"`` (default; repeats the
            edge, so border voxels never fade to zero), ``"zeros"`` or ``"reflection"``.

    Returns:
        ``(B, C, D, H, W)``.
    """
    if y.ndim != 5:
        raise ValueError(f"y must be (B, C, D, H, W), got shape {y.shape}.")
    sizes = [int(n) for n in y.shape[2:]]
    expected = [int(y.shape[0]), 3] + sizes
    if list(offsets.shape) != expected:
        raise ValueError(f"offsets must have shape {expected} for y of shape {y.shape}, got {offsets.shape}.")
    if padding_mode not in ["zeros", "border", "reflection"]:  # a literal: TorchScript cannot read the global
        raise ValueError(f"padding_mode must be one of zeros, border, reflection; got {padding_mode}.")
    offsets = offsets.to(y.dtype)
    axes = [torch.arange(n, dtype=y.dtype, device=y.device) for n in sizes]
    reference = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=0)  # (3, D, H, W), voxel (d, h, w)
    coords = reference.unsqueeze(0) + offsets  # (B, 3, D, H, W)
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in sizes], dtype=y.dtype, device=y.device)
    shift = (scale > 0).to(y.dtype)
    normalised = coords * scale.view(1, 3, 1, 1, 1) - shift.view(1, 3, 1, 1, 1)
    grid = _channels_last(normalised.flip(1))  # (B, D, H, W, 3) in grid_sample's (x=W, y=H, z=D) order
    return F.grid_sample(y, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


class OffsetNetwork(nn.Module):
    """Per-voxel displacement of the other stream: ``(B, C, D, H, W) x 2 -> (B, 3, D, H, W)`` in voxels.

    ``cat(x, y)`` -> 1x1x1 conv (2C -> C) -> depthwise 3x3x3 conv -> LayerNorm over channels -> GELU ->
    1x1x1 conv (C -> 3) -> ``offset_range * tanh``. The last convolution starts at zero, so training starts
    from the identity sampling and the offsets grow only where they help. LayerNorm (not batch or instance
    norm) keeps the block usable at batch size 1 on the one-voxel maps of the deepest stage.

    Args:
        channels: ``C``, channels of each stream.
        offset_range: bound of each displacement component, in voxels of this stage (default 1.0); 0 disables
            the deformation (plain cross-attention).
    """

    def __init__(self, channels: int, offset_range: float = 1.0) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}.")
        if offset_range < 0:
            raise ValueError(f"offset_range must be >= 0 voxels, got {offset_range}.")
        self.offset_range = float(offset_range)
        self.reduce = nn.Conv3d(2 * channels, channels, kernel_size=1)
        self.depthwise = nn.Conv3d(channels, channels, kernel_size=3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.act = nn.GELU()
        self.to_offsets = nn.Conv3d(channels, 3, kernel_size=1, bias=False)
        nn.init.zeros_(self.to_offsets.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.reduce(torch.cat((x, y), dim=1)))
        h = self.act(_channels_first(self.norm(_channels_last(h))))
        return self.offset_range * torch.tanh(self.to_offsets(h))


class CrossConvolutionBranch(nn.Module):
    """Grouped convolution over each query channel and its sampled counterpart:
    ``(B, C, D, H, W) x 2 -> (B, C, D, H, W)``.

    The two inputs are interleaved channel by channel, ``(x_0, y_0, x_1, y_1, ...)``, and convolved with
    ``groups=C`` (kernel ``kernel_size^3``, default 7), so output channel ``c`` mixes ``x_c`` with ``y_c`` over a
    large spatial neighbourhood at depthwise cost; then norm and GELU. The interleave is a ``stack`` on a new axis,
    not a reshape of existing memory.

    Args:
        channels: ``C``.
        kernel_size: odd kernel edge (default 7).
        norm: MONAI norm name or ``(name, args)`` (default ``"batch"``, as in the paper; ``"instance"`` also fits).
            In training, batch norm needs more than one value per channel (batch size x voxels > 1).
    """

    def __init__(self, channels: int, kernel_size: int = 7, norm: str | tuple = "batch") -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
        self.conv = nn.Conv3d(2 * channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = get_norm_layer(name=norm, spatial_dims=3, channels=channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        interleaved = torch.stack((x, y), dim=2).flatten(1, 2)  # (B, 2C, D, H, W): x_0, y_0, x_1, y_1, ...
        return self.act(self.norm(self.conv(interleaved)))


class ChannelInteraction(nn.Module):
    """Channel gate from a channel-first map: global average pool -> 1x1 bottleneck -> GELU -> 1x1 -> sigmoid;
    ``(B, C, D, H, W) -> (B, C)`` in (0, 1).

    Returns the gate rather than the gated input (unlike MONAI's ``ChannelSELayer``), because it is computed
    on the convolution branch and applied to the attention values.

    Args:
        channels: ``C``.
        reduction: bottleneck ratio; the hidden width is ``max(1, C // reduction)`` (default 4).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be positive, got {channels} and {reduction}.")
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(channels, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv3d(hidden, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x).flatten(1)


class SpatialInteraction(nn.Module):
    """Spatial gate from a channel-last map: Linear bottleneck -> GELU -> Linear to 1 channel -> sigmoid;
    ``(B, D, H, W, C) -> (B, D, H, W, 1)`` in (0, 1).

    Args:
        channels: ``C``.
        reduction: bottleneck ratio; the hidden width is ``max(1, C // reduction)`` (default 4).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be positive, got {channels} and {reduction}.")
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


class DeformableCrossFeatureBlendBlock(nn.Module):
    """DCFB block: the query stream ``x`` blends in the deformably sampled other stream ``y``;
    ``(B, C, D, H, W) x 2 -> (B, C, D, H, W)``.

    With ``x_n = LN_q(x)`` and ``y_n = LN_kv(y)`` (channels-last LayerNorms)::

        o   = offset_range * tanh(OffsetNet(cat(x_n, y_n)))          # (B, 3, D, H, W), voxels
        y_s = grid_sample(y_n, reference grid + o)                  # deformable sampling
        c   = GELU(Norm(GroupConv_{k^3}(interleave(x_n, y_s))))      # convolution branch
        a   = LWCA(q = x_n, k = v = y_s, values gated by ChannelInteraction(c))   # window cross-attention
        c   = c * SpatialInteraction(a)                              # spatial gate from the attention branch
        x   = x + DropPath(Linear_{2C -> C}(cat(a, c)))
        x   = x + DropPath(MLP(LN_mlp(x)))

    The two branches exchange gates as in MixFormer: the channel gate of the convolution branch scales the
    attention values (per channel, identical for every token, so it equals scaling the attention output before
    its projection), the spatial gate of the attention branch scales the convolution features. The MLP has
    its own LayerNorm (the public code reuses the pre-attention norm). Windows are not shifted: the 7^3
    convolution branch and the offsets carry information across window borders. The attention is
    :class:`~common.networks.blocks.window_attention.LocalWindowCrossAttention` (``softmax(q k^T / sqrt(head_dim)
    + B_rel) v`` per window, Swin relative position bias, padding keys masked), with one query and one context
    group; a stage smaller than the window uses a window clamped to it, which attends over the same voxels as
    padding it would.

    Args:
        dim: channels ``C`` of each stream.
        num_heads: attention heads; must divide ``dim``.
        window_size: attention window, int or ``(wd, wh, ww)`` in voxels of this stage, clamped to stages smaller
            than it (default 2).
        mlp_ratio: MLP hidden width / ``dim`` (default 4.0).
        offset_range: bound of the offsets in voxels of this stage (default 1.0).
        conv_kernel_size: odd kernel edge of the convolution branch (default 7).
        conv_norm: norm of the convolution branch, MONAI name (default ``"batch"``).
        interaction_reduction: bottleneck ratio of the channel and spatial gates (default 4).
        qkv_bias: bias in the query/key/value projections (default True).
        use_rel_pos_bias: Swin relative position bias in the attention (default True).
        drop: dropout after the blend projection and inside the MLP (default 0).
        attn_drop: dropout on the attention weights (default 0).
        drop_path: stochastic depth rate of both residual branches (default 0).
        padding_mode: ``grid_sample`` padding for samples outside the volume (default ``"border"``).
        fused_attention: attention through ``scaled_dot_product_attention`` (default True; see
            :func:`~common.networks.blocks.window_attention.attend_in_windows`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int] | int = 2,
        mlp_ratio: float = 4.0,
        offset_range: float = 1.0,
        conv_kernel_size: int = 7,
        conv_norm: str | tuple = "batch",
        interaction_reduction: int = 4,
        qkv_bias: bool = True,
        use_rel_pos_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        padding_mode: str = "border",
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
        _check_rate("drop", drop)
        _check_rate("drop_path", drop_path)
        self.dim = dim
        self.padding_mode = padding_mode
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.offsets = OffsetNetwork(dim, offset_range)
        self.attention = LocalWindowCrossAttention(
            dim,
            dim,
            num_heads,
            window_size=window_size,
            relative_position_bias=use_rel_pos_bias,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            fused_attention=fused_attention,
        )
        self.conv_branch = CrossConvolutionBranch(dim, conv_kernel_size, conv_norm)
        self.channel_interaction = ChannelInteraction(dim, interaction_reduction)
        self.spatial_interaction = SpatialInteraction(dim, interaction_reduction)
        self.blend = nn.Linear(2 * dim, dim)
        self.blend_drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLPBlock(
            dim, max(1, int(round(dim * mlp_ratio))), dropout_rate=drop, act="GELU", dropout_mode="swin"
        )

    def _blend(
        self, x: torch.Tensor, y: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The block's computation: ``(out, offsets, attention weights or None)``."""
        if x.ndim != 5 or x.shape != y.shape or x.shape[1] != self.dim:
            raise ValueError(f"x and y must both be (B, {self.dim}, D, H, W), got {x.shape} and {y.shape}.")
        x_cl = _channels_last(x)
        x_n = self.norm_query(x_cl)
        y_n = _channels_first(self.norm_context(_channels_last(y)))
        x_n_cf = _channels_first(x_n)

        offsets = self.offsets(x_n_cf, y_n)
        y_s = deformable_sample(y_n, offsets, self.padding_mode)

        conv = self.conv_branch(x_n_cf, y_s)
        gate = self.channel_interaction(conv)
        # one query and one context group: (B, 1, C, D, H, W)
        attention: torch.Tensor | None = None
        if need_weights:
            attended, attention = self.attention.forward_with_weights(x_n_cf.unsqueeze(1), y_s.unsqueeze(1), gate)
        else:
            attended = self.attention(x_n_cf.unsqueeze(1), y_s.unsqueeze(1), gate)
        attended = _channels_last(attended.squeeze(1))
        conv = _channels_last(conv) * self.spatial_interaction(attended)

        x_cl = x_cl + self.drop_path(self.blend_drop(self.blend(torch.cat((attended, conv), dim=-1))))
        x_cl = x_cl + self.drop_path(self.mlp(self.norm_mlp(x_cl)))
        return _channels_first(x_cl).contiguous(), offsets, attention

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: query stream, ``(B, C, D, H, W)``.
            y: other stream, same shape.

        Returns:
            the updated query stream ``(B, C, D, H, W)``.
        """
        return self._blend(x, y, False)[0]

    def forward_with_maps(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` plus ``{"offsets": (B, 3, D, H, W) in voxels, "attention": (B * nW, heads, N, N)}``."""
        out, offsets, attention = self._blend(x, y, True)
        assert attention is not None
        return out, {"offsets": offsets, "attention": attention}
