"""DC2Fusion: unsupervised 3D MRI-PET fusion with a shared-weight, dual-stream deformable cross-attention encoder.

L. Liu, X. Fan, C. Zhang, J. Dai, Y. Xie, X. Liang, "Three-Dimensional Medical Image Fusion with Deformable
Cross-Attention", ICONIP 2023 (arXiv 2310.06291); the method is known by its code name DC2Fusion. See
:mod:`common.networks.blocks.deformable_cross_attention` for the DCFB block. The network compiles with
``torch.jit.script``; ``forward`` takes one stacked MRI+PET tensor or the two volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks.patchembedding import PatchEmbed
from monai.networks.blocks.unetr_block import UnetrUpBlock

from common.networks.blocks.checkpointing import checkpoint_stage
from common.networks.blocks.deformable_cross_attention import DeformableCrossFeatureBlendBlock

__all__ = ["OUTPUT_ACTIVATIONS", "DC2Fusion", "DualStreamEncoderStage", "l1_weighted_fusion"]

#: choices of ``DC2Fusion(output_activation=...)``
OUTPUT_ACTIVATIONS = (None, "abs", "sigmoid")


def l1_weighted_fusion(
    f1: torch.Tensor, f2: torch.Tensor, eps: float = 1e-6, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1-norm weighted fusion of two feature maps: ``(B, C, *S) x 2 -> (B, C, *S), (B, 2, *S)``.

    The paper's fusion rule (``normalize=False``, the default): ``F = ||f_1||_1 f_1 + ||f_2||_1 f_2``, the weight of
    each map being, per voxel, its L1 norm over channels ``n_i = sum_c |f_i,c|``. With one channel per map this is
    ``F = |f_1| f_1 + |f_2| f_2``, and equal maps give ``F = 2 |f| f``.

    ``normalize=True`` (an option, not the paper) divides the weights by their sum, ``w_i = (n_i + eps) / ((n_1 +
    eps) + (n_2 + eps))``: they are positive and sum to 1 at every voxel, equal maps get exactly equal weights (so
    ``f_1 == f_2`` gives ``F == f_1``), and ``eps`` only matters where both maps vanish (``w_1 = w_2 = 1/2``).

    Returns:
        the fused map and the weights ``cat(w_1, w_2)`` along the channel axis.
    """
    if f1.shape != f2.shape or f1.ndim < 3:
        raise ValueError(f"f1 and f2 must share a (B, C, ...) shape, got {f1.shape} and {f2.shape}.")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    n1 = f1.abs().sum(dim=1, keepdim=True)
    n2 = f2.abs().sum(dim=1, keepdim=True)
    if normalize:
        total = n1 + n2 + 2 * eps
        n1, n2 = (n1 + eps) / total, (n2 + eps) / total
    return n1 * f1 + n2 * f2, torch.cat((n1, n2), dim=1)


class DualStreamEncoderStage(nn.Module):
    """One encoder stage applied to both streams with the same weights: ``(B, C_in, D, H, W) x 2 ->
    (B, C, D / k, H / k, W / k) x 2``.

    ``embed`` (patch embedding for the first stage, patch merging for the others) maps each stream; then each
    DCFB block updates the MRI stream from the PET stream and the PET stream from the *updated* MRI stream::

        x_mri = blk(x_mri, x_pet)
        x_pet = blk(x_pet, x_mri)

    Args:
        embed: the down-sampling embedding, e.g. MONAI's ``PatchEmbed``.
        blocks: the stage's :class:`DeformableCrossFeatureBlendBlock` modules.
    """

    def __init__(self, embed: nn.Module, blocks: Sequence[DeformableCrossFeatureBlendBlock]) -> None:
        super().__init__()
        if len(blocks) < 1:
            raise ValueError("a stage needs at least one DCFB block.")
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.embed(x), self.embed(y)
        for block in self.blocks:
            x = block(x, y)
            y = block(y, x)
        return x, y

    def forward_with_maps(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
        """:meth:`forward` plus the offsets and attention of every block call, in execution order (MRI, PET)."""
        x, y = self.embed(x), self.embed(y)
        maps: list[dict[str, torch.Tensor]] = []
        for block in self.blocks:
            x, mx = block.forward_with_maps(x, y)
            y, my = block.forward_with_maps(y, x)
            maps += [mx, my]
        return x, y, maps


class DC2Fusion(nn.Module):
    """DC2Fusion network: an MRI and a PET volume -> one fused volume, ``(B, 1, D, H, W) x 2 -> (B, 1, D, H, W)``.

    Liu et al., ICONIP 2023 (arXiv 2310.06291), code name DC2Fusion; 3D only.

    Encoder (one set of weights for both streams): patch embedding (Conv3d, kernel = stride = ``patch_size``,
    then LayerNorm; MONAI's ``PatchEmbed``) and ``len(depths)`` stages; stage ``i > 0`` starts with patch merging
    (Conv3d kernel 2 stride 2 + LayerNorm, again ``PatchEmbed``) and has ``embed_dim * 2**i`` channels. Each of
    its ``depths[i]`` DCFB blocks updates both streams in turn, the PET update seeing the new MRI features::

        x_mri = blk(x_mri, x_pet)
        x_pet = blk(x_pet, x_mri)

    Decoder (shared by the two streams): from the deepest stage up, patch expanding (ConvTranspose3d kernel 2
    stride 2) with concatenation of the stream's own skip features and a residual conv block (MONAI's
    ``UnetrUpBlock``), back to the patch grid with ``embed_dim`` channels.

    Head (the paper's): the two decoded streams are concatenated, a ConvTranspose3d (kernel = stride =
    ``patch_size``) returns to full resolution with ``2 * head_channels`` channels, split into ``f1`` and ``f2``, and
    the output is their L1-norm weighted combination ``F = ||f1||_1 f1 + ||f2||_1 f2`` (:func:`l1_weighted_fusion`),
    with no activation; ``head_channels`` is then ``out_channels`` (one channel each: ``F = |f1| f1 + |f2| f2``).

    Head options, all off by default (deviations from the paper; the model card reports when they help):
    ``normalize_fusion_weights`` divides the two weights by their sum (``F`` stays on the scale of the ``f_i``);
    ``fusion_projection`` adds a 1x1x1 convolution from ``head_channels`` fused channels to ``out_channels`` (so
    ``f1`` and ``f2`` may be wider than the output); ``output_activation`` ``"abs"`` returns ``|F|`` and
    ``"sigmoid"`` bounds ``F`` to (0, 1). The DC2Fusion loss cannot tell a fused image from its negative except
    through its L1 terms (MONAI's LNCC is squared, and SSIM(-x, x) is close to 1 where luminance and structure both
    flip sign), so short runs can settle on the negative; ``"abs"`` maps that basin onto the positive solution and
    keeps exact zeros reachable, ``"sigmoid"`` cannot reach the zero background the SSIM windows are sensitive to.

    Each encoder stage is a :class:`DualStreamEncoderStage`: stage 0 embeds patches, stage ``i > 0`` merges
    them, and its blocks update the two streams in turn.

    Input sizes: every spatial size must be divisible by ``patch_size * 2**(len(depths) - 1)``
    (:attr:`size_divisor`, 32 for the defaults; use MONAI's ``DivisiblePad`` otherwise); the attention windows
    are padded internally, so stages smaller than the window are fine. In training, the batch (or instance) norm
    of the convolution branch needs more than one value per channel at the deepest stage: with batch size 1 and
    the default four stages, a 32^3 input (one voxel there) fails; 64^3 and the paper's 128^3 work.

    Args:
        in_channels: channels of each input modality (default 1).
        out_channels: channels of the fused output (default 1).
        embed_dim: channels of the first stage (default 96).
        depths: DCFB blocks per stage (default ``(2, 2, 6, 2)``).
        num_heads: attention heads per stage; ``embed_dim * 2**i`` must be divisible by ``num_heads[i]``
            (default ``(3, 6, 12, 24)``).
        window_size: attention window in voxels of each stage, int or ``(wd, wh, ww)``, clamped to stages smaller
            than it (default 2).
        patch_size: patch embedding kernel and stride (default 4).
        mlp_ratio: MLP hidden width / channels (default 4.0).
        offset_range: bound of the deformable offsets, in voxels of each stage (default 1.0; 0 disables them).
        conv_kernel_size: kernel edge of the DCFB convolution branch (default 7).
        conv_norm: norm of the DCFB convolution branch, MONAI name (default ``"batch"``).
        decoder_norm: norm of the decoder conv blocks, MONAI name (default ``"instance"``).
        head_channels: channels of each of ``f1`` and ``f2`` (default None: ``out_channels``, the paper's head); a
            different value needs ``fusion_projection``.
        interaction_reduction: bottleneck ratio of the DCFB channel/spatial gates (default 4).
        qkv_bias: bias in the attention projections (default True).
        use_rel_pos_bias: Swin relative position bias in the window attention (default True).
        drop_rate: dropout in the DCFB blend projection and MLP (default 0).
        attn_drop_rate: dropout on the attention weights (default 0).
        drop_path_rate: stochastic depth, increasing linearly over all blocks up to this value (default 0).
        fusion_eps: ``eps`` of :func:`l1_weighted_fusion` (default 1e-6).
        normalize_fusion_weights: normalise the L1-norm weights to sum to 1 (default False: the paper's
            ``F = ||f1||_1 f1 + ||f2||_1 f2``).
        fusion_projection: a 1x1x1 convolution from the fused ``head_channels`` to ``out_channels`` (default False).
        output_activation: ``None`` (default, the paper), ``"abs"`` or ``"sigmoid"``, applied to the fused output.
        padding_mode: ``grid_sample`` padding of the deformable sampling (default ``"border"``).
        fused_attention: window attention through ``scaled_dot_product_attention`` (default True; same output
            within float rounding, see :func:`~common.networks.blocks.window_attention.attend_in_windows`).
        gradient_checkpointing: in training, recompute each encoder stage's activations in the backward pass
            instead of storing them (:func:`~common.networks.blocks.checkpointing.checkpoint_stage`): less memory
            at large ROIs for about one more encoder forward per step; same outputs and gradients (default False).

    Example::

        net = DC2Fusion(embed_dim=12, depths=(1, 1), num_heads=(1, 2))
        fused = net(mri, pet)  # (B, 1, 32, 32, 32) each -> (B, 1, 32, 32, 32)
        fused, maps = net.forward_with_maps(mri, pet)  # offsets, attention and fusion weights
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 2,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        offset_range: float = 1.0,
        conv_kernel_size: int = 7,
        conv_norm: str | tuple = "batch",
        decoder_norm: str | tuple = "instance",
        head_channels: int | None = None,
        interaction_reduction: int = 4,
        qkv_bias: bool = True,
        use_rel_pos_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fusion_eps: float = 1e-6,
        normalize_fusion_weights: bool = False,
        fusion_projection: bool = False,
        output_activation: str | None = None,
        padding_mode: str = "border",
        fused_attention: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        head_channels = out_channels if head_channels is None else head_channels
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("embed_dim", embed_dim),
            ("patch_size", patch_size),
            ("head_channels", head_channels),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads need one entry per stage, got {depths} and {num_heads}.")
        if any(d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one block, got depths={depths}.")
        widths = [embed_dim * 2**i for i in range(len(depths))]
        for i, (width, heads) in enumerate(zip(widths, num_heads)):
            if heads < 1 or width % heads != 0:
                raise ValueError(f"stage {i} has {width} channels, not divisible by num_heads[{i}]={heads}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        if fusion_eps <= 0:
            raise ValueError(f"fusion_eps must be positive, got {fusion_eps}.")
        if head_channels != out_channels and not fusion_projection:
            raise ValueError(
                f"head_channels ({head_channels}) must equal out_channels ({out_channels}) in the paper's head; set "
                "fusion_projection=True for a 1x1x1 convolution from head_channels to out_channels."
            )
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}.")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_divisor = patch_size * 2 ** (len(depths) - 1)
        self.fusion_eps = fusion_eps
        self.normalize_fusion_weights = normalize_fusion_weights
        self.output_activation = "none" if output_activation is None else output_activation
        self.gradient_checkpointing = bool(gradient_checkpointing)

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            embed = (
                PatchEmbed(patch_size, in_channels, embed_dim, norm_layer=nn.LayerNorm, spatial_dims=3)
                if i == 0
                else PatchEmbed(2, widths[i - 1], widths[i], norm_layer=nn.LayerNorm, spatial_dims=3)
            )
            first = sum(depths[:i])
            blocks = [
                DeformableCrossFeatureBlendBlock(
                    dim=widths[i],
                    num_heads=heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    offset_range=offset_range,
                    conv_kernel_size=conv_kernel_size,
                    conv_norm=conv_norm,
                    interaction_reduction=interaction_reduction,
                    qkv_bias=qkv_bias,
                    use_rel_pos_bias=use_rel_pos_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[first + j],
                    padding_mode=padding_mode,
                    fused_attention=fused_attention,
                )
                for j in range(depth)
            ]
            stages.append(DualStreamEncoderStage(embed, blocks))
        self.stages = nn.ModuleList(stages)
        # decoder[k] lifts stage (n-1-k) to stage (n-2-k), concatenating that stage's skip
        self.decoder = nn.ModuleList(
            UnetrUpBlock(
                spatial_dims=3,
                in_channels=widths[i],
                out_channels=widths[i - 1],
                kernel_size=3,
                upsample_kernel_size=2,
                norm_name=decoder_norm,
                res_block=True,
            )
            for i in range(len(depths) - 1, 0, -1)
        )
        self.head_up = nn.ConvTranspose3d(2 * embed_dim, 2 * head_channels, kernel_size=patch_size, stride=patch_size)
        self.head_out = nn.Conv3d(head_channels, out_channels, kernel_size=1) if fusion_projection else nn.Identity()

    def _split_inputs(self, mri: torch.Tensor, pet: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if pet is None:
            if mri.ndim != 5 or mri.shape[1] != 2 * self.in_channels:
                raise ValueError(
                    f"with pet=None the input must stack MRI and PET on the channel axis, (B, {2 * self.in_channels},"
                    f" D, H, W); got {mri.shape}."
                )
            pet = mri[:, self.in_channels :]
            mri = mri[:, : self.in_channels]
        if mri.ndim != 5 or mri.shape[1] != self.in_channels:
            raise ValueError(f"mri must be (B, {self.in_channels}, D, H, W), got {mri.shape}.")
        if pet.shape != mri.shape:
            raise ValueError(f"mri and pet must have the same shape, got {mri.shape} and {pet.shape}.")
        for size in mri.shape[2:]:
            if size % self.size_divisor != 0:
                raise ValueError(
                    f"spatial size {mri.shape[2:]} is not divisible by {self.size_divisor} (patch_size * "
                    f"2**(stages - 1)); pad or crop the volumes, e.g. with monai.transforms.DivisiblePad(k="
                    f"{self.size_divisor})."
                )
        return mri, pet

    def _decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Deepest stage up to the patch grid: ``UnetrUpBlock`` with each shallower skip in turn."""
        n = len(skips)
        out = skips[n - 1]
        for k, up in enumerate(self.decoder):
            out = up(out, skips[n - 2 - k])
        return out

    def _head(self, skips_x: list[torch.Tensor], skips_y: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode both streams, return to full resolution and fuse: ``(fused, fusion weights)``."""
        features = self.head_up(torch.cat((self._decode(skips_x), self._decode(skips_y)), dim=1))
        f1, f2 = features.chunk(2, dim=1)
        fused, weights = l1_weighted_fusion(f1, f2, self.fusion_eps, self.normalize_fusion_weights)
        out = self.head_out(fused)
        if self.output_activation == "abs":
            out = out.abs()
        elif self.output_activation == "sigmoid":
            out = torch.sigmoid(out)
        return out, weights

    def forward(self, mri: torch.Tensor, pet: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            mri: ``(B, in_channels, D, H, W)``, or MRI and PET stacked on the channel axis when ``pet`` is None
                (the form MONAI inferers, ``verify_net_in_out`` and the TorchScript export pass).
            pet: ``(B, in_channels, D, H, W)``.

        Returns:
            the fused volume ``(B, out_channels, D, H, W)``.
        """
        x, y = self._split_inputs(mri, pet)
        skips_x: list[torch.Tensor] = []
        skips_y: list[torch.Tensor] = []
        for stage in self.stages:
            if not torch.jit.is_scripting() and self.gradient_checkpointing and self.training:
                x, y = checkpoint_stage(stage, x, y)
            else:
                x, y = stage(x, y)
            skips_x.append(x)
            skips_y.append(y)
        return self._head(skips_x, skips_y)[0]

    def forward_with_maps(
        self, mri: torch.Tensor, pet: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Fuse and return the intermediate maps for inspection (eager mode only).

        Returns:
            ``(fused, maps)``; ``maps["blocks"]`` lists one dict per block call in execution order with keys
            ``stage``, ``block``, ``query`` (``"mri"`` or ``"pet"``), ``offsets`` ``(B, 3, d, h, w)`` in voxels of
            that stage and ``attention`` ``(B * nW, heads, N, N)``; ``maps["fusion_weights"]`` is
            ``(B, 2, D, H, W)`` (the weights of ``f1`` and ``f2``).
        """
        x, y = self._split_inputs(mri, pet)
        skips_x, skips_y, block_maps = [], [], []
        for i, stage in enumerate(self.stages):
            x, y, maps = stage.forward_with_maps(x, y)
            skips_x.append(x)
            skips_y.append(y)
            for k, m in enumerate(maps):
                block_maps.append({"stage": i, "block": k // 2, "query": ("mri", "pet")[k % 2], **m})
        fused, weights = self._head(skips_x, skips_y)
        return fused, {"blocks": block_maps, "fusion_weights": weights}
