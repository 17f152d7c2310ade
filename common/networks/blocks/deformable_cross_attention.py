"""Deformable cross feature blend (DCFB) block of DC2Fusion and its pieces.

L. Liu, X. Fan, C. Zhang, J. Dai, Y. Xie, X. Liang, "Three-Dimensional Medical Image Fusion with Deformable
Cross-Attention", ICONIP 2023 (arXiv 2310.06291); the method is known by its code name DC2Fusion. One block lets
a *query* stream ``x`` (e.g. MRI features) gather information from the *other* stream ``y`` (e.g. PET features) of
the same encoder stage:

1. :class:`OffsetNetwork` predicts a bounded displacement per voxel from ``cat(x, y)``;
2. :func:`deformable_sample` resamples ``y`` at the reference grid plus those displacements;
3. :class:`WindowCrossAttention` attends from ``x`` (queries) to the sampled ``y`` (keys, values) in
   non-overlapping 3D windows;
4. :class:`CrossConvolutionBranch` convolves ``x`` with the sampled ``y``;
5. :class:`ChannelInteraction` / :class:`SpatialInteraction` exchange gates between the two branches
   (the bidirectional interaction of MixFormer, Chen et al., CVPR 2022), which are then concatenated and
   projected (:class:`DeformableCrossFeatureBlendBlock`).

All blocks are 3D. Feature maps travel between blocks channel-first ``(B, C, D, H, W)``; attention and the
MLP work channel-last ``(B, D, H, W, C)``, and every switch between the two layouts is an explicit
``permute`` (the public code reshapes channel-first memory into channel-last shapes, scrambling features).

Everything here compiles with ``torch.jit.script`` (the bundles export to TorchScript), which is why reshapes are
written with ``reshape``/``permute`` and typed window helpers rather than einops or MONAI's untyped Swin
``window_partition``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.mlp import MLPBlock
from monai.networks.layers.drop_path import DropPath
from monai.networks.layers.utils import get_norm_layer
from monai.utils import ensure_tuple_rep

from common.networks.blocks.window_attention import window_partition, window_reverse

__all__ = [
    "deformable_sample",
    "OffsetNetwork",
    "WindowCrossAttention",
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


class WindowCrossAttention(nn.Module):
    """Multi-head cross-attention inside non-overlapping 3D windows: queries from ``x``, keys and values from
    ``context``; ``(B, D, H, W, C) x 2 -> (B, D, H, W, C)`` (channel-last).

    ``Attention(Q, K, V) = softmax(Q K^T / sqrt(head_dim) + B_rel) V`` per window of
    ``window_size^3`` voxels, with the Swin relative position bias ``B_rel`` (a learned table of
    ``(2w-1)^3`` entries per head, Liu et al. 2021). Volumes whose size is not a multiple of the window are
    zero-padded at the far end internally; the padded keys are masked out of the softmax (every window keeps
    at least one real voxel), and the output is cropped back.

    Written here rather than taken from MONAI: :class:`monai.networks.blocks.CrossAttentionBlock` has no
    windowing and only the decomposed (query-dependent) relative position embedding, and the Swin
    ``WindowAttention`` of :mod:`monai.networks.nets.swin_unetr` is self-attention only (and not scriptable).

    Args:
        dim: channels ``C``.
        num_heads: attention heads; must divide ``dim``.
        window_size: window edge (int, or one per axis), default 2.
        qkv_bias: add a bias to the query, key and value projections (default True).
        use_rel_pos_bias: add the relative position bias (default True).
        attn_drop: dropout on the attention weights (default 0).
        proj_drop: dropout after the output projection (default 0).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int, int] = 2,
        qkv_bias: bool = True,
        use_rel_pos_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}).")
        window = [int(w) for w in ensure_tuple_rep(window_size, 3)]
        if any(w < 1 for w in window):
            raise ValueError(f"window_size must be positive, got {window_size}.")
        _check_rate("attn_drop", attn_drop)
        _check_rate("proj_drop", proj_drop)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window
        self.scale = self.head_dim**-0.5
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # Swin relative position index: token pair (i, j) of a window -> row of the bias table
        wd, wh, ww = window
        coords = torch.stack(torch.meshgrid([torch.arange(w) for w in window], indexing="ij")).flatten(1)  # (3, N)
        relative = coords[:, :, None] - coords[:, None, :] + torch.tensor([wd - 1, wh - 1, ww - 1])[:, None, None]
        index = relative[0] * (2 * wh - 1) * (2 * ww - 1) + relative[1] * (2 * ww - 1) + relative[2]
        self.register_buffer("relative_position_index", index, persistent=False)  # (N, N)
        self.relative_position_bias_table = None
        if use_rel_pos_bias:
            table_size = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor | None:
        """The bias added to the attention logits, ``(heads, N, N)`` with ``N = prod(window_size)``, or None."""
        table = self.relative_position_bias_table
        if table is None:
            return None
        n = self.relative_position_index.shape[0]
        bias = table[self.relative_position_index.reshape(-1)]  # (N * N, heads)
        return bias.reshape(n, n, -1).permute(2, 0, 1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B * nW, N, C) -> (B * nW, heads, N, C / heads)``."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, value_gate: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: queries, ``(B, D, H, W, C)``.
            context: keys and values, ``(B, D, H, W, C)``.
            value_gate: optional per-sample channel gate ``(B, C)`` multiplied into the values (the channel
                interaction of the DCFB block).

        Returns:
            ``(out, attention)``: ``(B, D, H, W, C)`` and the softmax weights ``(B * nW, heads, N, N)`` with
            windows ordered batch-major, then along D, H, W (:func:`~common.networks.blocks.window_attention.window_partition` order).
        """
        if x.ndim != 5 or x.shape != context.shape or x.shape[-1] != self.dim:
            raise ValueError(f"x and context must both be (B, D, H, W, {self.dim}), got {x.shape} and {context.shape}.")
        b, d, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        wd, wh, ww = self.window_size[0], self.window_size[1], self.window_size[2]
        pd, ph, pw = (wd - d % wd) % wd, (wh - h % wh) % wh, (ww - w % ww) % ww
        padded = pd > 0 or ph > 0 or pw > 0
        if padded:
            x = F.pad(x, [0, 0, 0, pw, 0, ph, 0, pd])
            context = F.pad(context, [0, 0, 0, pw, 0, ph, 0, pd])
        dp, hp, wp = d + pd, h + ph, w + pw
        num_windows = (dp // wd) * (hp // wh) * (wp // ww)

        q = self._heads(self.to_q(window_partition(x, self.window_size)))  # (B * nW, heads, N, C / heads)
        k, v = self.to_kv(window_partition(context, self.window_size)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        if value_gate is not None:
            if value_gate.ndim != 2 or value_gate.shape[0] != b or value_gate.shape[1] != self.dim:
                raise ValueError(f"value_gate must be (B, C) = ({b}, {self.dim}), got {value_gate.shape}.")
            gate = value_gate.reshape(b, self.num_heads, 1, self.head_dim)  # (B, heads, 1, C / heads)
            v = v * gate.repeat_interleave(num_windows, dim=0)  # windows are batch-major

        logits = torch.matmul(q * self.scale, k.transpose(-2, -1))  # (B * nW, heads, N, N)
        bias = self.relative_position_bias()
        if bias is not None:
            logits = logits + bias.unsqueeze(0)
        if padded:
            valid = torch.zeros(1, dp, hp, wp, 1, dtype=x.dtype, device=x.device)
            valid[:, :d, :h, :w] = 1.0
            key_valid = window_partition(valid, self.window_size)[:, :, 0] > 0.5  # (nW, N)
            key_valid = key_valid.repeat(b, 1)[:, None, None, :]  # (B * nW, 1, 1, N), batch-major
            logits = logits.masked_fill(~key_valid, float("-inf"))
        attention = logits.softmax(dim=-1)

        out = torch.matmul(self.attn_drop(attention), v)  # (B * nW, heads, N, C / heads)
        out = out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], self.dim)  # (B * nW, N, C)
        out = self.proj_drop(self.proj(out))
        out = window_reverse(out, self.window_size, [dp, hp, wp])
        return out[:, :d, :h, :w].contiguous(), attention


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
        a   = WindowCrossAttention(q = x_n, k = v = y_s, values gated by ChannelInteraction(c))
        c   = c * SpatialInteraction(a)                              # spatial gate from the attention branch
        x   = x + DropPath(Linear_{2C -> C}(cat(a, c)))
        x   = x + DropPath(MLP(LN_mlp(x)))

    The two branches exchange gates as in MixFormer: the channel gate of the convolution branch scales the
    attention values (per channel, identical for every token, so it equals scaling the attention output before
    its projection), the spatial gate of the attention branch scales the convolution features. The MLP has
    its own LayerNorm (the public code reuses the pre-attention norm). Windows are not shifted: the 7^3
    convolution branch and the offsets carry information across window borders.

    Args:
        dim: channels ``C`` of each stream.
        num_heads: attention heads; must divide ``dim``.
        window_size: attention window edge (default 2).
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
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 2,
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
        self.attention = WindowCrossAttention(dim, num_heads, window_size, qkv_bias, use_rel_pos_bias, attn_drop)
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

    def _blend(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's computation: ``(out, offsets, attention)``."""
        if x.ndim != 5 or x.shape != y.shape or x.shape[1] != self.dim:
            raise ValueError(f"x and y must both be (B, {self.dim}, D, H, W), got {x.shape} and {y.shape}.")
        x_cl = _channels_last(x)
        x_n = self.norm_query(x_cl)
        y_n = _channels_first(self.norm_context(_channels_last(y)))
        x_n_cf = _channels_first(x_n)

        offsets = self.offsets(x_n_cf, y_n)
        y_s = deformable_sample(y_n, offsets, self.padding_mode)

        conv = self.conv_branch(x_n_cf, y_s)
        attended, attention = self.attention(x_n, _channels_last(y_s), value_gate=self.channel_interaction(conv))
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
        return self._blend(x, y)[0]

    def forward_with_maps(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` plus ``{"offsets": (B, 3, D, H, W) in voxels, "attention": (B * nW, heads, N, N)}``."""
        out, offsets, attention = self._blend(x, y)
        return out, {"offsets": offsets, "attention": attention}
