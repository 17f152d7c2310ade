"""HLWA-UNet: Hybrid Local Window Attention U-Net for 4-modality 3D brain tumour MRI.

"Hybrid Local Window Attention Assisted U-Net", MICCAI 2025, doi:10.1007/978-3-032-04937-7_22.
The architecture follows the paper figure (the public code is partial and does not run):

    x (B, 4, D, H, W) = [T1c, T1, T2, FLAIR]
      -> four modality encoders (separate weights; LWSA at the deeper stages)  -> f1, f2, f3, f4
      bottleneck:  f_f = M(f1, f2, f3, f4)                                   (fusion)
                   f_a, f_b, f_c = DRL branches on f_f                       (decoupled regions)
                   f12 = conv(M(f1, f2)),  f34 = conv(M(f3, f4))             (modality pairs)
                   z = LWCA(Q = [f_b, f12, f34], K = V = [f1, f2, f3, f4])   (cross-attention)
      decoder: U-Net up blocks from z with skips M(e1_l, e2_l, e3_l, e4_l) at every level
      -> 1x1 head -> (B, out_channels, D, H, W) logits (TC, WT, ET)

``f_a, f_b, f_c`` feed the region-aware contrastive loss (:mod:`common.losses.region_contrastive`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.convolutions import Convolution
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from common.networks.blocks.checkpointing import checkpoint_stage
from common.networks.blocks.window_attention import LocalWindowCrossAttention, LocalWindowTransformerBlock

__all__ = ["HLWAUNet", "ModalityFusion"]

FUSION_MODES = ("concat", "sum")


class ModalityFusion(nn.Module):
    """The fusion operator ``M`` of HLWA-UNet: ``k`` maps ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``.

    ``"concat"``: channel concatenation then a 1x1x1 convolution ``k * C_in -> C_out`` (learned weighting
    of the modalities). ``"sum"``: element-wise sum of the maps, followed by a 1x1x1 convolution only
    when ``C_in != C_out``.

    Args:
        num_inputs: number of maps ``k`` fused.
        in_channels: channels ``C_in`` of each map.
        out_channels: channels ``C_out`` of the result.
        mode: ``"concat"`` or ``"sum"``.
    """

    def __init__(self, num_inputs: int, in_channels: int, out_channels: int, mode: str = "concat") -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {mode!r}.")
        if num_inputs < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                "num_inputs, in_channels, out_channels must be positive, "
                f"got {num_inputs}, {in_channels}, {out_channels}."
            )
        self.concat = mode == "concat"
        self.num_inputs = num_inputs
        fused_in = num_inputs * in_channels if self.concat else in_channels
        self.proj: nn.Module = (
            nn.Conv3d(fused_in, out_channels, kernel_size=1)
            if self.concat or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """``k x (B, C_in, D, H, W) -> (B, C_out, D, H, W)``."""
        if len(maps) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} maps to fuse, got {len(maps)}.")
        if self.concat:
            fused = torch.cat(maps, dim=1)
        else:
            fused = maps[0]
            for m in maps[1:]:
                fused = fused + m
        return self.proj(fused)


class _ModalityEncoder(nn.Module):
    """One single-channel encoder: a MONAI ``Convolution`` block (conv-norm-act) at level 0, a stride-2
    ``UnetResBlock`` per deeper level, and at the attention levels ``depth`` LWSA transformer blocks
    after it (every second one shifted when ``shift``). With ``gradient_checkpointing`` each level's
    activations are recomputed in backward (training only).

    ``(B, 1, D, H, W) -> [(B, features[l], D / 2^l, H / 2^l, W / 2^l) for each level l]``.
    """

    def __init__(
        self,
        features: Sequence[int],
        attention_stages: Sequence[int],
        attention_depth: int,
        num_heads: int,
        window_size: Sequence[int],
        shift_windows: bool,
        relative_position_bias: bool,
        mlp_ratio: float,
        norm_name: str | tuple,
        act_name: str | tuple,
        dropout: float,
        fused_attention: bool,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        stages = []
        in_ch = 1
        for level, ch in enumerate(features):
            conv_dropout = dropout if dropout > 0 else None
            layers: list[nn.Module] = []
            if level == 0:
                # a single conv block at full resolution: there are four encoders, and this keeps their
                # full-resolution cost near that of one single-encoder U-Net level
                layers.append(
                    Convolution(3, in_ch, ch, kernel_size=3, norm=norm_name, act=act_name, dropout=conv_dropout)
                )
            else:
                layers.append(
                    UnetResBlock(
                        3, in_ch, ch, kernel_size=3, stride=2, norm_name=norm_name, act_name=act_name,
                        dropout=conv_dropout,
                    )
                )  # fmt: skip
            if level in attention_stages:
                for i in range(attention_depth):
                    shift = [w // 2 for w in window_size] if shift_windows and i % 2 == 1 else [0, 0, 0]
                    layers.append(
                        LocalWindowTransformerBlock(
                            ch, num_heads, window_size=window_size, shift_size=shift,
                            relative_position_bias=relative_position_bias, mlp_ratio=mlp_ratio, dropout=dropout,
                            fused_attention=fused_attention,
                        )
                    )  # fmt: skip
            stages.append(nn.Sequential(*layers))
            in_ch = ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        for stage in self.stages:
            if not torch.jit.is_scripting() and self.gradient_checkpointing and self.training:
                x = checkpoint_stage(stage, x)
            else:
                x = stage(x)
            feats.append(x)
        return feats


class _DecoderLevel(nn.Module):
    """``M`` over the four encoders' skips of one level, then a MONAI ``UnetUpBlock``:
    ``(B, C_{l+1}, d, h, w), 4 x (B, C_l, 2d, 2h, 2w) -> (B, C_l, 2d, 2h, 2w)``."""

    def __init__(self, fusion: ModalityFusion, up: UnetUpBlock) -> None:
        super().__init__()
        self.fuse = fusion
        self.up = up

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.up(x, self.fuse(skips))


class HLWAUNet(nn.Module):
    """Hybrid Local Window Attention U-Net (HLWA-UNet, MICCAI 2025, doi:10.1007/978-3-032-04937-7_22).

    ``(B, 4, D, H, W) -> (B, out_channels, D, H, W)`` logits. The four input channels must be in the
    collection's order **T1c, T1, T2, FLAIR** (reorder e.g. MSD Task01's FLAIR, T1w, T1gd, T2w first);
    channel ``m`` goes to encoder ``m``. Only 3D is supported.

    Structure (see the module docstring for the diagram):

    * **Encoders**: four single-channel encoders with separate weights: one MONAI ``Convolution`` block
      (conv 3^3 - norm - act) at full resolution (four encoders' worth of full-resolution work is the
      dominant CPU cost, so it is kept to one conv each), then one stride-2 ``UnetResBlock`` per level,
      ``len(features) - 1`` downsamplings.
      At the levels in ``attention_stages`` ``attention_depth`` LWSA blocks follow
      (:class:`~common.networks.blocks.window_attention.LocalWindowTransformerBlock`).
    * **Bottleneck**: ``f_f = M(f1..f4)`` (``features[-1]`` channels); DRL: three branches
      ``Conv3d(k3, p1) -> InstanceNorm3d -> LeakyReLU(0.2)`` give ``f_a, f_b, f_c`` (``region_channels``
      each); ``f12 = conv(M(f1, f2))`` (T1c + T1), ``f34 = conv(M(f3, f4))`` (T2 + FLAIR), same block.
    * **LWCA** (:class:`~common.networks.blocks.window_attention.LocalWindowCrossAttention`): queries are the
      stack ``[f_b, f12, f34]`` (3 token groups per window), keys/values the four modality bottleneck
      features (4 groups per window, so each query token sees all modalities of its window in one
      softmax). Pre-norm residual per query group: ``q_g + LWCA(LN(q), LN(f1..f4))_g``. The three outputs
      are merged by concatenation and a 1x1x1 conv block to ``features[-1]`` channels for the decoder.
    * **Decoder**: MONAI ``UnetUpBlock`` per level (transposed conv x2, concat skip, two conv blocks);
      the skip of level ``l`` is ``M`` of the four encoders' level-``l`` features. ``UnetOutBlock`` 1x1 head.

    ``M`` is :class:`ModalityFusion` with ``fusion`` (``"concat"``: concat + 1x1 conv; ``"sum"``: sum).

    Forward contract: eval mode, TorchScript, or ``return_region_features=False`` -> the segmentation
    tensor; eager training mode with ``return_region_features=True`` -> ``(seg, f_a, f_b, f_c)``, the
    region features ``(B, region_channels, D / 2^L, H / 2^L, W / 2^L)``, ``L = len(features) - 1``.
    Each spatial input dimension must be divisible by ``2^L`` (16 by default), else a ``ValueError`` names
    the size and the divisor; non-cubic inputs work. Training needs a bottleneck of more than one voxel
    (instance normalisation), e.g. at least one dimension of ``2 * 2^L``.

    Args:
        spatial_dims: must be 3 (the method is defined for 3D volumes only). Default 3.
        in_channels: must be 4 (T1c, T1, T2, FLAIR). Default 4.
        out_channels: output channels (TC, WT, ET). Default 3.
        features: widths of the encoder levels, full resolution first; the last is the bottleneck.
            Widths are per modality encoder (the four together are 4x as wide). Default
            ``(8, 16, 32, 64, 128)`` (4 downsamplings), sized for sliding-window inference at 128^3 on a CPU;
            ``(16, 32, 64, 128, 256)`` has 4x the parameters (34.2M vs 8.6M) and about 1.5x the CPU
            inference time at 64^3.
        region_channels: width of each DRL branch and of ``f12``/``f34`` (the LWCA query width).
            Default None -> ``features[-1]`` (128 by default: the paper's example bottleneck gives 512 -> 128 per
            branch, 512 being four concatenated 128-wide modality features; here ``M`` first projects the
            concatenation to ``features[-1]``).
        window_size: LWSA/LWCA window, int or ``(wd, wh, ww)``; clamped to small maps. Default 4.
        num_heads: attention heads of every LWSA and the LWCA; must divide each attention width. Default 4.
        attention_stages: encoder levels (0 = full resolution) with LWSA. Default ``(3, 4)``, the two
            deepest levels of the default layout (16^3 and 8^3 tokens at a 128^3 input).
        attention_depth: LWSA blocks per attention level. Default 2.
        shift_windows: every second LWSA block uses windows shifted by ``window // 2`` (Swin SW-MSA with
            the correct region mask); needs ``attention_depth >= 2``. Default False (plain non-overlapping windows).
        relative_position_bias: learned relative position bias in LWSA and LWCA. Default True.
        mlp_ratio: hidden width of the MLP in each LWSA block over its channels. Default 4.
        fusion: the operator ``M``, ``"concat"`` or ``"sum"``. Default ``"concat"``.
        norm_name: normalisation of the convolution blocks (MONAI name). Default ``"instance"``.
        act_name: activation of the encoder/decoder convolution blocks (MONAI name).
            Default ``("leakyrelu", {"inplace": True, "negative_slope": 0.01})``.
        dropout: dropout rate in the convolution blocks, attention and MLPs, in ``[0, 1)``. Default 0.
        return_region_features: in eager training mode return ``(seg, f_a, f_b, f_c)``. Default True.
        fused_attention: LWSA and LWCA through ``scaled_dot_product_attention`` (PyTorch's fused kernels); same
            output within float rounding (see :func:`~common.networks.blocks.window_attention.attend_in_windows`).
            Default True.
        gradient_checkpointing: in training, recompute the four encoders' activations level by level in the
            backward pass instead of storing them (:func:`~common.networks.blocks.checkpointing.checkpoint_stage`):
            less memory at large ROIs for about one more encoder forward per step; same outputs and gradients.
            Default False.

    Example::

        net = HLWAUNet()
        seg, f_a, f_b, f_c = net.train()(torch.randn(1, 4, 64, 64, 64))
        seg = net.eval()(torch.randn(1, 4, 64, 64, 64))  # (1, 3, 64, 64, 64)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        features: Sequence[int] = (8, 16, 32, 64, 128),
        region_channels: int | None = None,
        window_size: Sequence[int] | int = 4,
        num_heads: int = 4,
        attention_stages: Sequence[int] = (3, 4),
        attention_depth: int = 2,
        shift_windows: bool = False,
        relative_position_bias: bool = True,
        mlp_ratio: float = 4.0,
        fusion: str = "concat",
        norm_name: str | tuple = "instance",
        act_name: str | tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        dropout: float = 0.0,
        return_region_features: bool = True,
        fused_attention: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"HLWAUNet supports only spatial_dims=3 (3D volumes), got spatial_dims={spatial_dims}.")
        if in_channels != 4:
            raise ValueError(
                f"HLWAUNet needs in_channels=4 (T1c, T1, T2, FLAIR, one encoder each), got in_channels={in_channels}."
            )
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}.")
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features needs at least 2 positive widths (one downsampling), got {features}.")
        region_channels = features[-1] if region_channels is None else int(region_channels)
        if region_channels < 1:
            raise ValueError(f"region_channels must be positive, got {region_channels}.")
        if isinstance(window_size, int):
            window = [window_size] * 3
        else:
            window = [int(w) for w in window_size]
        if len(window) != 3 or min(window) < 1:
            raise ValueError(f"window_size must be a positive int or 3 positive ints, got {window_size!r}.")
        stages = sorted({int(s) for s in attention_stages})
        if len(stages) != len(list(attention_stages)) or any(s < 0 or s >= len(features) for s in stages):
            raise ValueError(
                f"attention_stages must be distinct encoder levels in [0, {len(features) - 1}], "
                f"got {tuple(attention_stages)}."
            )
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        for s in stages:
            if features[s] % num_heads != 0:
                raise ValueError(
                    f"features[{s}]={features[s]} (an attention stage) is not divisible by num_heads={num_heads}."
                )
        if region_channels % num_heads != 0:
            raise ValueError(
                f"region_channels={region_channels} (the LWCA width) is not divisible by num_heads={num_heads}."
            )
        if attention_depth < 1:
            raise ValueError(f"attention_depth must be at least 1, got {attention_depth}.")
        if shift_windows and attention_depth < 2 and len(stages) > 0:
            raise ValueError("shift_windows=True needs attention_depth >= 2 (regular and shifted blocks alternate).")
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")

        self.features = features
        self.region_channels = region_channels
        self.num_downsamplings = len(features) - 1
        self.divisor = 2**self.num_downsamplings
        self.return_region_features = return_region_features
        bottleneck = features[-1]
        conv_dropout = dropout if dropout > 0 else None

        self.encoders = nn.ModuleList(
            [
                _ModalityEncoder(
                    features, stages, attention_depth, num_heads, window, shift_windows,
                    relative_position_bias, mlp_ratio, norm_name, act_name, dropout,
                    fused_attention, bool(gradient_checkpointing),
                )
                for _ in range(4)
            ]
        )  # fmt: skip

        # bottleneck: modality fusion and decoupled representation learning (DRL) branches
        self.fuse_all = ModalityFusion(4, bottleneck, bottleneck, fusion)
        self.region_a = self._region_branch(bottleneck, region_channels)
        self.region_b = self._region_branch(bottleneck, region_channels)
        self.region_c = self._region_branch(bottleneck, region_channels)
        self.fuse_t1c_t1 = ModalityFusion(2, bottleneck, bottleneck, fusion)
        self.fuse_t2_flair = ModalityFusion(2, bottleneck, bottleneck, fusion)
        self.pair_t1c_t1 = self._region_branch(bottleneck, region_channels)
        self.pair_t2_flair = self._region_branch(bottleneck, region_channels)

        # hybrid cross-attention: queries [f_b, f12, f34], keys/values [f1, f2, f3, f4]
        self.query_norm = nn.LayerNorm(region_channels)
        self.context_norm = nn.LayerNorm(bottleneck)
        self.cross_attention = LocalWindowCrossAttention(
            region_channels, bottleneck, num_heads, window_size=window,
            relative_position_bias=relative_position_bias, attn_drop=dropout, proj_drop=dropout,
            fused_attention=fused_attention,
        )  # fmt: skip
        self.cross_merge = Convolution(
            3, 3 * region_channels, bottleneck, kernel_size=1, norm=norm_name, act=act_name, dropout=conv_dropout
        )

        # decoder, deepest level first: skips fused over the four encoders, then a U-Net up block
        self.decoder = nn.ModuleList(
            [
                _DecoderLevel(
                    ModalityFusion(4, features[level], features[level], fusion),
                    UnetUpBlock(
                        3, features[level + 1], features[level], kernel_size=3, stride=1, upsample_kernel_size=2,
                        norm_name=norm_name, act_name=act_name, dropout=conv_dropout,
                    ),
                )
                for level in reversed(range(self.num_downsamplings))
            ]
        )  # fmt: skip
        self.head = UnetOutBlock(3, features[0], out_channels)

    @staticmethod
    def _region_branch(in_channels: int, out_channels: int) -> Convolution:
        """DRL / modality-pair branch: ``Conv3d(k3, p1) -> InstanceNorm3d -> LeakyReLU(0.2)`` (paper figure)."""
        return Convolution(
            3, in_channels, out_channels, kernel_size=3, norm="instance", act=("leakyrelu", {"negative_slope": 0.2})
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 4:
            raise ValueError(
                f"HLWAUNet expects input (B, 4, D, H, W) with channels T1c, T1, T2, FLAIR, got shape {list(x.shape)}."
            )
        for dim in range(2, 5):
            if x.shape[dim] % self.divisor != 0:
                raise ValueError(
                    f"HLWAUNet input spatial size {list(x.shape[2:])}: size {x.shape[dim]} (dim {dim}) is not "
                    f"divisible by {self.divisor} = 2**{self.num_downsamplings} (one halving per downsampling); "
                    "pad or crop the input."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, 4, D, H, W) -> (B, out_channels, D, H, W)``, or ``(seg, f_a, f_b, f_c)`` in eager training mode."""
        self._check_input(x)
        per_modality: list[list[torch.Tensor]] = []
        for m, encoder in enumerate(self.encoders):
            per_modality.append(encoder(x[:, m : m + 1]))
        f1, f2, f3, f4 = per_modality[0][-1], per_modality[1][-1], per_modality[2][-1], per_modality[3][-1]

        f_f = self.fuse_all([f1, f2, f3, f4])
        f_a = self.region_a(f_f)
        f_b = self.region_b(f_f)
        f_c = self.region_c(f_f)
        f12 = self.pair_t1c_t1(self.fuse_t1c_t1([f1, f2]))
        f34 = self.pair_t2_flair(self.fuse_t2_flair([f3, f4]))

        # (B, 3, Cr, d, h, w) queries and (B, 4, Cb, d, h, w) keys/values, LayerNorm over channels
        queries = torch.stack([f_b, f12, f34], dim=1)
        context = torch.stack([f1, f2, f3, f4], dim=1)
        q_norm = self.query_norm(queries.permute(0, 1, 3, 4, 5, 2)).permute(0, 1, 5, 2, 3, 4)
        c_norm = self.context_norm(context.permute(0, 1, 3, 4, 5, 2)).permute(0, 1, 5, 2, 3, 4)
        attended = queries + self.cross_attention(q_norm, c_norm)
        y = self.cross_merge(attended.flatten(1, 2))

        for j, decoder_level in enumerate(self.decoder):
            level = self.num_downsamplings - 1 - j
            y = decoder_level(y, [feats[level] for feats in per_modality])
        seg = self.head(y)

        if not torch.jit.is_scripting():
            if self.training and self.return_region_features:
                return seg, f_a, f_b, f_c
        return seg
