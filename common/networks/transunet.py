"""2D TransUNet for COVID-19 lesion segmentation on axial CT slices, with a contrastive projection head.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv 2102.04306 (R50-ViT layout), as used by El Fahsi et al. on top of the 3D GAN pseudo-masks of
Shabani et al. (Computers in Biology and Medicine 2022). Attention is MONAI's ``SABlock``, which scales
``q k^T`` by ``head_dim ** -0.5``; the public code of the COVID pipeline multiplied by ``sqrt(d)``
instead, which saturates the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, TransformerBlock
from monai.networks.layers.factories import Conv, Norm
from monai.networks.nets.resnet import ResNetBottleneck

__all__ = ["TransUNet"]


def _bottleneck_stage(in_channels: int, out_channels: int, stride: int, depth: int) -> nn.Sequential:
    """``depth`` ResNet bottleneck units (MONAI's ``ResNetBottleneck``, expansion 4) -> ``out_channels``."""
    blocks: list[nn.Module] = []
    for i in range(depth):
        cin, s = (in_channels, stride) if i == 0 else (out_channels, 1)
        down = None
        if s != 1 or cin != out_channels:
            down = nn.Sequential(
                Conv[Conv.CONV, 2](cin, out_channels, kernel_size=1, stride=s, bias=False),
                Norm[Norm.BATCH, 2](out_channels),
            )
        blocks.append(ResNetBottleneck(cin, out_channels // ResNetBottleneck.expansion, 2, s, down))
    return nn.Sequential(*blocks)


class _DecoderBlock(nn.Module):
    """Bilinear x2 upsampling, optional skip concatenation, then (conv3x3-BN-ReLU) x 2."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False)
        self.conv1 = Convolution(2, in_channels + skip_channels, out_channels, kernel_size=3, norm="batch", act="relu")
        self.conv2 = Convolution(2, out_channels, out_channels, kernel_size=3, norm="batch", act="relu")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    """TransUNet (R50-ViT style, 2D): CNN encoder, ViT on the deepest map, cascaded upsampling decoder.

    ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` logits, ``H = W = img_size`` by default (see below for
    other sizes).
    :meth:`embed` gives a ``(B, proj_dim)`` embedding (not normalised; the contrastive losses normalise it)
    from a projection head on the globally pooled ViT output, the feature the supervised contrastive terms
    of the COVID pipeline act on (the public code used the flattened output map instead, a defect). The
    projection head is used by :meth:`embed` only, the decoder by :meth:`forward` only: the two training
    phases share the encoder and nothing else.

    Layout (resolutions for ``img_size = 128``):

    1. stem: 7x7 stride-2 convolution, BN, ReLU -> ``stem_channels`` at 1/2 (64 x 64), then 3x3 stride-2
       max pooling to 1/4 as in ResNet;
    2. three stages of MONAI ``ResNetBottleneck`` units (``encoder_depths`` units each; torchvision is not
       a dependency) -> ``encoder_channels`` at 1/4, 1/8, 1/16 (8 x 8);
    3. ViT over the 1/16 map with patch size 1: 1x1 convolution to ``hidden_size``, learned position
       embeddings (``(img_size / 16) ** 2`` tokens), ``vit_layers`` MONAI ``TransformerBlock`` (pre-norm,
       ``vit_heads`` heads, MLP ``vit_mlp_dim``), final LayerNorm;
    4. 3x3 convolution (BN, ReLU) to ``head_channels``; four decoder blocks of bilinear x2 upsampling,
       skip concatenation (1/8, 1/4 and 1/2 encoder maps; none at full size) and (conv3x3-BN-ReLU) x 2
       with ``decoder_channels``; 1x1 convolution to ``out_channels``.

    Other input sizes: any height and width divisible by 16 are accepted; the learned position embeddings
    (a ``(img_size / 16)``-square grid) are then resized bilinearly to the token grid, as TransUNet does when
    it loads weights trained at another resolution. At ``img_size`` they are used as they are.

    Scriptable (``torch.jit.script(model)`` compiles :meth:`forward`); the attention matrices of the last
    forward are available from :meth:`attention_maps` when built with ``save_attn=True``.

    Args:
        in_channels: input channels. Default 1.
        out_channels: output channels (logits). Default 1.
        img_size: input height = width the position embeddings are learned for, divisible by 16.
            Default 128 (the pipeline's 128 x 128 slices).
        stem_channels: width of the stem. Default 64 (ResNet-50).
        encoder_channels: output widths of the three bottleneck stages, each divisible by 4.
            Default ``(256, 512, 1024)`` (ResNet-50).
        encoder_depths: bottleneck units per stage. Default ``(1, 1, 1)`` (one block per stage as in the
            COVID pipeline; ``(3, 4, 9)`` is the original R50-ViT hybrid).
        vit_layers: transformer blocks. Default 8.
        vit_heads: attention heads. Default 4.
        vit_mlp_dim: MLP width of the transformer blocks. Default 512.
        hidden_size: token width, divisible by ``vit_heads``. Default 256 (not stated by the pipeline; half
            the MLP width).
        head_channels: width of the convolution after the ViT. Default 512.
        decoder_channels: widths of the four decoder blocks. Default ``(256, 128, 64, 16)``.
        proj_dim: embedding size of the projection head. Default 128.
        dropout_rate: dropout in the transformer. Default 0.1.
        save_attn: keep each block's attention matrix for :meth:`attention_maps`. Default False.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        img_size: int = 128,
        stem_channels: int = 64,
        encoder_channels: Sequence[int] = (256, 512, 1024),
        encoder_depths: Sequence[int] = (1, 1, 1),
        vit_layers: int = 8,
        vit_heads: int = 4,
        vit_mlp_dim: int = 512,
        hidden_size: int = 256,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        proj_dim: int = 128,
        dropout_rate: float = 0.1,
        save_attn: bool = False,
    ) -> None:
        super().__init__()
        if img_size < 16 or img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16, got {img_size}")
        if len(encoder_channels) != 3 or any(int(c) < 4 or int(c) % 4 for c in encoder_channels):
            raise ValueError(f"encoder_channels must be 3 widths divisible by 4, got {tuple(encoder_channels)}")
        if len(encoder_depths) != 3 or any(int(d) < 1 for d in encoder_depths):
            raise ValueError(f"encoder_depths must be 3 positive counts, got {tuple(encoder_depths)}")
        if len(decoder_channels) != 4 or any(int(c) < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be 4 positive widths, got {tuple(decoder_channels)}")
        if hidden_size < 1 or vit_heads < 1 or hidden_size % vit_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by vit_heads ({vit_heads})")
        if vit_layers < 1 or vit_mlp_dim < 1 or proj_dim < 1 or head_channels < 1 or stem_channels < 1:
            raise ValueError("vit_layers, vit_mlp_dim, proj_dim, head_channels and stem_channels must be >= 1")
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}")
        enc = [int(c) for c in encoder_channels]
        dec = [int(c) for c in decoder_channels]
        self.img_size = img_size
        self.grid_size = img_size // 16

        self.stem = Convolution(2, in_channels, stem_channels, strides=2, kernel_size=7, norm="batch", act="relu")
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage1 = _bottleneck_stage(stem_channels, enc[0], 1, int(encoder_depths[0]))
        self.stage2 = _bottleneck_stage(enc[0], enc[1], 2, int(encoder_depths[1]))
        self.stage3 = _bottleneck_stage(enc[1], enc[2], 2, int(encoder_depths[2]))

        self.patch_embedding = nn.Conv2d(enc[2], hidden_size, kernel_size=1)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.embedding_dropout = nn.Dropout(dropout_rate)
        self.vit_blocks = nn.ModuleList(
            TransformerBlock(hidden_size, vit_mlp_dim, vit_heads, dropout_rate, save_attn=save_attn)
            for _ in range(vit_layers)
        )
        self.vit_norm = nn.LayerNorm(hidden_size)

        self.conv_more = Convolution(2, hidden_size, head_channels, kernel_size=3, norm="batch", act="relu")
        skips = [enc[1], enc[0], stem_channels, 0]
        ins = [head_channels, *dec[:-1]]
        self.decoder = nn.ModuleList(_DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, dec))
        self.segmentation_head = nn.Conv2d(dec[-1], out_channels, kernel_size=1)
        self.projection = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, proj_dim)
        )

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """``(1, grid_h * grid_w, hidden)``: the learned embeddings, resized bilinearly if the token grid differs."""
        if grid_h == self.grid_size and grid_w == self.grid_size:
            return self.position_embedding
        hidden = self.position_embedding.shape[-1]
        square = self.position_embedding.transpose(1, 2).reshape(1, hidden, self.grid_size, self.grid_size)
        resized = F.interpolate(square, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return resized.flatten(2).transpose(1, 2)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """``(B, C, H, W) -> ((B, N, hidden) tokens, [1/8, 1/4, 1/2 skip maps], [H / 16, W / 16])``."""
        # skipped while tracing, where shapes are tensors (a trace is specialised to its input size anyway)
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[-2] % 16 != 0 or x.shape[-1] % 16 != 0):
            raise ValueError(f"TransUNet expects (B, C, H, W) inputs with H and W divisible by 16, got {list(x.shape)}")
        x0 = self.stem(x)
        s1 = self.stage1(self.pool(x0))
        s2 = self.stage2(s1)
        s3 = self.stage3(s2)
        grid = [int(s3.shape[-2]), int(s3.shape[-1])]
        tokens = self.patch_embedding(s3).flatten(2).transpose(1, 2)  # (B, N, hidden)
        tokens = self.embedding_dropout(tokens + self._position_embedding(grid[0], grid[1]))
        for block in self.vit_blocks:
            tokens = block(tokens)
        return self.vit_norm(tokens), [s2, s1, x0], grid

    def _decode(self, tokens: torch.Tensor, skips: list[torch.Tensor], grid: list[int]) -> torch.Tensor:
        b, n, c = tokens.shape
        y = self.conv_more(tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1]))
        for i, block in enumerate(self.decoder):
            skip: torch.Tensor | None = skips[i] if i < len(skips) else None
            y = block(y, skip)
        return self.segmentation_head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H, W)`` segmentation logits."""
        tokens, skips, grid = self._encode(x)
        return self._decode(tokens, skips, grid)

    @torch.jit.unused
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, proj_dim)`` embedding for the contrastive terms: encoder and projection head only.

        The decoder is not run, so a contrastive step neither computes it nor changes its batch-norm statistics.
        """
        tokens, _, _ = self._encode(x)
        return self.projection(tokens.mean(dim=1))

    @torch.jit.unused
    def attention_maps(self) -> list[torch.Tensor]:
        """Attention matrices ``(B, heads, N, N)`` of each ViT block from the last forward (``save_attn=True``)."""
        maps = [block.attn.att_mat for block in self.vit_blocks]
        if not all(m.numel() for m in maps):
            raise RuntimeError("no attention saved: build the model with save_attn=True and run a forward first")
        return maps
