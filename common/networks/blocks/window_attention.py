"""Local window attention for 3D feature maps: self-attention (LWSA) and cross-attention (LWCA).

The blocks of the Hybrid Local Window Attention U-Net (HLWA-UNet, "Hybrid Local Window Attention
Assisted U-Net", MICCAI 2025, doi:10.1007/978-3-032-04937-7_22). Attention is computed inside
non-overlapping 3D windows of ``wd x wh x ww`` voxels (default 4x4x4), as in Swin Transformer
(Liu et al., ICCV 2021, arXiv:2103.14030):

    Attention(Q, K, V) = softmax(Q K^T * head_dim^-0.5 + B) V

with ``B`` an optional learned relative position bias. Shifted windows (``shift_size > 0``) roll
the feature map before partitioning and use a mask so that tokens that came from different
regions before the roll never attend to each other.

Why MONAI's own ``monai.networks.nets.swin_unetr.WindowAttention`` is not reused: it only does
self-attention on pre-partitioned tokens, its helpers (``window_partition``, ``compute_mask``)
take Python sequences and loop over slices and are not TorchScript-friendly, and padded voxels
take part in attention as keys. Here both attention kinds share one windowing code path that
works on channel-first ``(B, C, D, H, W)`` maps, pads to window multiples internally, masks the
padding out of the keys, clamps the window to small feature maps and scripts with TorchScript.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), with the relative
position bias and the shift/padding mask folded into its additive ``attn_mask``, so that PyTorch's fused
kernels (flash / memory-efficient on CUDA, flash on CPU) do the work; :func:`window_attention` is the explicit
``softmax(q k^T + B) v`` that also returns the weights (``forward_with_weights``, tests). One case stays explicit:
on the CPU, PyTorch's fused kernel does not differentiate ``attn_mask``, so a learned bias in training sends SDPA
to its unfused math path, which measured slower than the explicit one (see :func:`attend_in_windows`).

Token order inside a window is row-major over ``(d, h, w)``; window order is row-major over the
window grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.mlp import MLPBlock
from torch import nn

__all__ = [
    "attend_in_windows",
    "LocalWindowCrossAttention",
    "LocalWindowSelfAttention",
    "LocalWindowTransformerBlock",
    "RelativePositionBias",
    "effective_window",
    "relative_position_index",
    "sdpa_attention_mask",
    "sdpa_window_attention",
    "shifted_window_mask",
    "window_attention",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
    "window_token_regions",
]


def _as_triple(value: Sequence[int] | int, name: str) -> list[int]:
    """``4 -> [4, 4, 4]``; validates a per-dimension integer argument of a 3D block."""
    if isinstance(value, int):
        triple = [value, value, value]
    else:
        triple = [int(v) for v in value]
    if len(triple) != 3:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints (D, H, W), got {value!r}.")
    return triple


def window_partition(x: torch.Tensor, window_size: list[int]) -> torch.Tensor:
    """Split a channel-last map into windows of tokens.

    Args:
        x: ``(B, D, H, W, C)`` with ``D, H, W`` multiples of ``window_size``.
        window_size: ``[wd, wh, ww]``.

    Returns:
        ``(B * nW, wd * wh * ww, C)`` where ``nW = (D / wd) * (H / wh) * (W / ww)``.
    """
    b, d, h, w, c = x.shape
    wd, wh, ww = window_size[0], window_size[1], window_size[2]
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    # (B, nD, wd, nH, wh, nW, ww, C) -> (B, nD, nH, nW, wd, wh, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window_size: list[int], spatial_size: list[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, wd * wh * ww, C) -> (B, D, H, W, C)``.

    Args:
        windows: tokens per window, in the order produced by :func:`window_partition`.
        window_size: ``[wd, wh, ww]``.
        spatial_size: ``[D, H, W]`` of the (padded) map, multiples of ``window_size``.
    """
    d, h, w = spatial_size[0], spatial_size[1], spatial_size[2]
    wd, wh, ww = window_size[0], window_size[1], window_size[2]
    c = windows.shape[-1]
    b = windows.shape[0] // ((d // wd) * (h // wh) * (w // ww))
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, c)
    # (B, nD, nH, nW, wd, wh, ww, C) -> (B, nD, wd, nH, wh, nW, ww, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, c)


def effective_window(
    spatial_size: list[int], window_size: list[int], shift_size: list[int]
) -> tuple[list[int], list[int]]:
    """Clamp the window (and drop the shift) along dimensions where the map is not larger than the window.

    A ``2 x 8 x 8`` map with window 4 uses windows of ``2 x 4 x 4``; shifting a dimension that
    holds a single window would only wrap the map onto itself, so its shift becomes 0 (Swin does the same).

    Returns:
        ``(window, shift)``, each ``[d, h, w]``.
    """
    window: list[int] = []
    shift: list[int] = []
    for i in range(3):
        if spatial_size[i] <= window_size[i]:
            window.append(spatial_size[i])
            shift.append(0)
        else:
            window.append(window_size[i])
            shift.append(shift_size[i])
    return window, shift


def window_token_regions(
    padded_size: list[int],
    window_size: list[int],
    shift_size: list[int],
    valid_size: list[int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label every token of every window with its pre-shift region and whether it is a real voxel.

    The map is padded at the end of each dimension to ``padded_size`` and then rolled by
    ``-shift_size``. Along one dimension of length ``P`` the rolled positions ``[0, P - w)``,
    ``[P - w, P - s)`` and ``[P - s, P)`` came from three different places of the unrolled map
    (the last one wrapped around from the start); tokens of one window may only attend to tokens
    carrying the same region label. With ``s = 0`` every window holds a single label.

    Args:
        padded_size: ``[D, H, W]`` after padding, multiples of ``window_size``.
        window_size: ``[wd, wh, ww]``.
        shift_size: ``[sd, sh, sw]``, each in ``[0, window)``.
        valid_size: ``[D, H, W]`` before padding; positions beyond it are padding.
        device: where to build the labels.

    Returns:
        ``(regions, valid)``, both ``(nW, wd * wh * ww)``: an integer region label (0..26) and a
        boolean that is ``False`` for padding voxels.
    """
    labels: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    for i in range(3):
        pos = torch.arange(padded_size[i], device=device)
        region = (pos >= padded_size[i] - window_size[i]).long()
        if shift_size[i] > 0:
            region = region + (pos >= padded_size[i] - shift_size[i]).long()
        labels.append(region)
        # validity is defined on the unrolled map, then rolled like the features
        valid.append(torch.roll(pos < valid_size[i], shifts=-shift_size[i], dims=0))
    region_map = labels[0].view(-1, 1, 1) * 9 + labels[1].view(1, -1, 1) * 3 + labels[2].view(1, 1, -1)
    valid_map = valid[0].view(-1, 1, 1) & valid[1].view(1, -1, 1) & valid[2].view(1, 1, -1)
    regions = window_partition(region_map.unsqueeze(0).unsqueeze(-1), window_size).squeeze(-1)
    valid_tokens = window_partition(valid_map.unsqueeze(0).unsqueeze(-1), window_size).squeeze(-1)
    return regions, valid_tokens


def window_attention_mask(
    regions_q: torch.Tensor, valid_q: torch.Tensor, regions_k: torch.Tensor, valid_k: torch.Tensor
) -> torch.Tensor:
    """Boolean attention mask per window, ``True`` where a query must NOT attend to a key.

    A query is blocked from a key of another pre-shift region, and a real (non-padding) query is
    blocked from padding keys. Padding queries may see padding keys of their own region: their
    outputs are cropped away, and this keeps every softmax row non-empty (no NaN, also in backward).

    Args:
        regions_q, valid_q: ``(nW, Nq)`` from :func:`window_token_regions` (tiled per query group).
        regions_k, valid_k: ``(nW, Nk)``.

    Returns:
        ``(nW, Nq, Nk)`` bool.
    """
    other_region = regions_q.unsqueeze(2) != regions_k.unsqueeze(1)
    padding_key = valid_q.unsqueeze(2) & ~valid_k.unsqueeze(1)
    return other_region | padding_key


def shifted_window_mask(
    padded_size: list[int],
    window_size: list[int],
    shift_size: list[int],
    valid_size: list[int],
    device: torch.device,
) -> torch.Tensor:
    """Self-attention mask for (shifted) windows of a padded map: ``(nW, N, N)`` bool, ``True`` = blocked.

    See :func:`window_token_regions` for the arguments and :func:`window_attention_mask` for the rule.
    """
    regions, valid = window_token_regions(padded_size, window_size, shift_size, valid_size, device)
    return window_attention_mask(regions, valid, regions, valid)


def relative_position_index(window_size: list[int], table_window: list[int], device: torch.device) -> torch.Tensor:
    """Index into a relative-position table for every (query, key) pair of a window.

    The table is laid out for offsets of a ``table_window`` (``(2 td - 1)(2 th - 1)(2 tw - 1)``
    entries); ``window_size`` may be smaller (a clamped window), its offsets are a subset.

    Returns:
        ``(N, N)`` long, ``N = wd * wh * ww``.
    """
    grids = torch.meshgrid(
        [
            torch.arange(window_size[0], device=device),
            torch.arange(window_size[1], device=device),
            torch.arange(window_size[2], device=device),
        ],
        indexing="ij",
    )
    coords = torch.stack(grids).flatten(1)  # (3, N)
    rel = coords.unsqueeze(2) - coords.unsqueeze(1)  # (3, N, N), offsets in [-(t - 1), t - 1]
    span_h = 2 * table_window[1] - 1
    span_w = 2 * table_window[2] - 1
    return (
        (rel[0] + table_window[0] - 1) * span_h * span_w
        + (rel[1] + table_window[1] - 1) * span_w
        + rel[2]
        + table_window[2]
        - 1
    )


class RelativePositionBias(nn.Module):
    """Learned bias ``B[h, i, j]`` added to the attention logits, indexed by the 3D offset between tokens i and j.

    Args:
        window_size: the largest window the bias is used for, int or ``(wd, wh, ww)``.
        num_heads: one bias table per head.

    ``forward(window)`` returns ``(num_heads, N, N)`` for a window not larger than ``window_size``.
    """

    def __init__(self, window_size: Sequence[int] | int, num_heads: int) -> None:
        super().__init__()
        self.window_size = _as_triple(window_size, "window_size")
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}.")
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}.")
        size = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) * (2 * self.window_size[2] - 1)
        self.table = nn.Parameter(torch.zeros(size, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer(
            "index", relative_position_index(self.window_size, self.window_size, torch.device("cpu")), persistent=False
        )

    def forward(self, window_size: list[int]) -> torch.Tensor:
        """``[wd, wh, ww] -> (num_heads, N, N)``."""
        if window_size == self.window_size:
            index = self.index
        else:
            index = relative_position_index(window_size, self.window_size, self.table.device)
        n = index.shape[0]
        return self.table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention inside windows, returning the attention weights as well.

    Args:
        q: ``(B * nW, heads, Nq, head_dim)``.
        k, v: ``(B * nW, heads, Nk, head_dim)``.
        scale: multiplies the logits (``head_dim ** -0.5``).
        bias: ``(heads, Nq, Nk)`` added to the logits, or None.
        mask: ``(nW, Nq, Nk)`` bool, ``True`` = blocked (logit set to -inf), or None.
        dropout: dropout probability on the weights before they multiply ``v`` (pass 0 in eval).

    Returns:
        ``(out, weights)``: ``(B * nW, heads, Nq, head_dim)`` and ``(B * nW, heads, Nq, Nk)``; every
        row of ``weights`` (returned before dropout) sums to 1.
    """
    logits = torch.matmul(q * scale, k.transpose(-2, -1))
    if bias is not None:
        logits = logits + bias.unsqueeze(0)
    if mask is not None:
        bnw, heads, nq, nk = logits.shape
        n_windows = mask.shape[0]
        logits = logits.view(bnw // n_windows, n_windows, heads, nq, nk)
        logits = logits.masked_fill(mask.unsqueeze(0).unsqueeze(2), float("-inf")).view(bnw, heads, nq, nk)
    weights = torch.softmax(logits, dim=-1)
    dropped = F.dropout(weights, p=dropout, training=True) if dropout > 0.0 else weights
    return torch.matmul(dropped, v), weights


def sdpa_attention_mask(bias: torch.Tensor | None, mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The bias and the blocking mask of :func:`window_attention` as one additive ``attn_mask`` for SDPA.

    Args:
        bias: ``(heads, Nq, Nk)`` or None.
        mask: ``(nW, Nq, Nk)`` bool, ``True`` = blocked, or None.
        batch: ``B`` of the ``B * nW`` window batch (windows are batch-major).

    Returns:
        None without bias and mask; ``(1, heads, Nq, Nk)`` (the bias, broadcast over windows) without a mask;
        else ``(B * nW, heads or 1, Nq, Nk)`` with ``-inf`` where blocked. Always 4D: PyTorch's fused CPU kernel
        takes only a 4D mask and falls back to the unfused math path otherwise.
    """
    if mask is None:
        return None if bias is None else bias.unsqueeze(0)
    blocked = mask.unsqueeze(1)  # (nW, 1, Nq, Nk)
    if bias is None:
        additive = torch.zeros(blocked.shape, dtype=torch.float32, device=mask.device)
    else:
        additive = bias.unsqueeze(0)
    additive = additive.masked_fill(blocked, float("-inf"))
    return additive.repeat(batch, 1, 1, 1) if batch > 1 else additive


def sdpa_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """:func:`window_attention` through ``F.scaled_dot_product_attention``: same arguments, returns only ``out``
    ``(B * nW, heads, Nq, head_dim)`` (no weights; that is what lets SDPA use a fused kernel)."""
    attn_mask = sdpa_attention_mask(bias, mask, q.shape[0] // mask.shape[0] if mask is not None else 1)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)


def attend_in_windows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    dropout: float = 0.0,
    fused: bool = True,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Window attention by :func:`sdpa_window_attention` where that is fused, else by :func:`window_attention`.

    The explicit path is taken when the weights are wanted (``need_weights``), when ``fused`` is False, and on the
    CPU when the bias needs a gradient (a learned relative position bias in training): PyTorch's fused CPU kernel
    cannot differentiate ``attn_mask``, and the math path SDPA falls back to measured about 20% slower than the
    explicit one (PyTorch 2.13; on CUDA the memory-efficient kernel differentiates the mask).

    Returns:
        ``(out, weights)``, ``weights`` None on the SDPA path (see :func:`window_attention` for the shapes).
    """
    if fused and not need_weights:
        grad_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        if not (grad_bias and q.device.type == "cpu"):
            return sdpa_window_attention(q, k, v, scale, bias, mask, dropout), None
    out, weights = window_attention(q, k, v, scale, bias, mask, dropout)
    return out, weights


def _pad_to_windows(x: torch.Tensor, window_size: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad a channel-last ``(B, D, H, W, C)`` map at the end of each dimension to window multiples."""
    pad_d = (window_size[0] - x.shape[1] % window_size[0]) % window_size[0]
    pad_h = (window_size[1] - x.shape[2] % window_size[1]) % window_size[1]
    pad_w = (window_size[2] - x.shape[3] % window_size[2]) % window_size[2]
    if pad_d > 0 or pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
    return x, [x.shape[1], x.shape[2], x.shape[3]]


class LocalWindowSelfAttention(nn.Module):
    """Local window self-attention (LWSA) of HLWA-UNet on a 3D feature map: ``(B, C, D, H, W) -> (B, C, D, H, W)``.

    Inside each non-overlapping window of ``window_size`` voxels the tokens attend to each other:
    ``q, k, v = x W_q, x W_k, x W_v``; ``softmax(q k^T * head_dim^-0.5 + B) v``; output projection.
    The map is zero-padded to window multiples internally (padding never acts as a key) and the
    window is clamped to the map where the map is smaller. With ``shift_size > 0`` the map is rolled
    by ``-shift_size`` first (Swin's SW-MSA) and the shifted-window mask keeps the pre-shift regions apart.

    Args:
        dim: channels ``C``.
        num_heads: attention heads; ``dim`` must be divisible by it.
        window_size: window, int or ``(wd, wh, ww)``. Default 4 (4x4x4 windows, as in the paper).
        shift_size: cyclic shift, int or ``(sd, sh, sw)``, each in ``[0, window)``. Default 0 (no shift).
        relative_position_bias: add a learned relative position bias to the logits. Default True.
        qkv_bias: bias in the q/k/v projections. Default True.
        attn_drop: dropout on the attention weights. Default 0.
        proj_drop: dropout after the output projection. Default 0.
        fused_attention: compute ``forward`` with ``scaled_dot_product_attention`` (see
            :func:`attend_in_windows`); False computes the weights explicitly, as ``forward_with_weights`` always
            does. Same output within float rounding. Default True.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int] | int = 4,
        shift_size: Sequence[int] | int = 0,
        relative_position_bias: bool = True,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}).")
        self.window_size = _as_triple(window_size, "window_size")
        self.shift_size = _as_triple(shift_size, "shift_size")
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}.")
        for s, w in zip(self.shift_size, self.window_size):
            if not 0 <= s < w:
                raise ValueError(
                    f"shift_size {self.shift_size} must lie in [0, window_size) = [0, {self.window_size})."
                )
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}.")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = float((dim // num_heads) ** -0.5)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = float(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.position_bias: RelativePositionBias | None = (
            RelativePositionBias(self.window_size, num_heads) if relative_position_bias else None
        )
        self.fused_attention = bool(fused_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C, D, H, W)``."""
        return self._attend(x, False)[0]

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward`` and also return the attention weights ``(B * nW, heads, N, N)`` (before dropout)."""
        out, weights = self._attend(x, True)
        assert weights is not None  # need_weights=True always takes the explicit path
        return out, weights

    def _attend(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"expected input (B, {self.dim}, D, H, W), got {list(x.shape)}.")
        b, c, d, h, w = x.shape
        window, shift = effective_window([d, h, w], self.window_size, self.shift_size)
        tokens, padded = _pad_to_windows(x.permute(0, 2, 3, 4, 1), window)
        shifted = shift[0] > 0 or shift[1] > 0 or shift[2] > 0
        if shifted:
            tokens = torch.roll(tokens, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        tokens = window_partition(tokens, window)  # (B * nW, N, C)
        bnw, n, _ = tokens.shape
        qkv = self.qkv(tokens).reshape(bnw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        mask: torch.Tensor | None = None
        if shifted or padded != [d, h, w]:
            mask = shifted_window_mask(padded, window, shift, [d, h, w], x.device)
        bias: torch.Tensor | None = None
        if self.position_bias is not None:
            bias = self.position_bias(window)
        drop = self.attn_drop if self.training else 0.0
        out, weights = attend_in_windows(
            qkv[0], qkv[1], qkv[2], self.scale, bias, mask, drop, self.fused_attention, need_weights
        )
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(bnw, n, c)))
        out = window_reverse(out, window, padded)
        if shifted:
            out = torch.roll(out, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
        out = out[:, :d, :h, :w, :].permute(0, 4, 1, 2, 3).contiguous()
        return out, weights


class LocalWindowCrossAttention(nn.Module):
    """Local window cross-attention (LWCA) of HLWA-UNet between groups of co-registered 3D maps.

    ``(B, Gq, Cq, D, H, W), (B, Gk, Ck, D, H, W) -> (B, Gq, Cq, D, H, W)``

    Q/K/V assignment: inside one window, the ``Gq`` query maps contribute ``Gq * N`` query tokens
    (``N = wd * wh * ww``) and the ``Gk`` context maps ``Gk * N`` key/value tokens; every query token
    attends to all key/value tokens of its window, across all context groups, with one softmax.
    In HLWA-UNet the queries are the stack ``[f_b, f12, f34]`` (``Gq = 3``) and the context the four
    modality bottleneck features (``Gk = 4``). ``q = query W_q`` (``Cq -> Cq``), ``k, v = context W_k,
    context W_v`` (``Ck -> Cq``), scale ``(Cq / heads)^-0.5``, softmax, output projection. The optional
    relative position bias depends on the spatial offset only and is shared by all group pairs.
    Padding to window multiples and window clamping work as in :class:`LocalWindowSelfAttention`;
    windows are not shifted (a single cross-attention layer has no neighbour to alternate with).
    An optional per-sample channel gate multiplies the values (``forward(..., value_gate=g)``, ``g (B, Cq)``):
    the channel interaction of DC2Fusion's DCFB block
    (:class:`~common.networks.blocks.deformable_cross_attention.DeformableCrossFeatureBlendBlock`), which uses this
    block with one query and one context group.

    Args:
        query_channels: ``Cq`` (also the attention width); divisible by ``num_heads``.
        context_channels: ``Ck``.
        num_heads: attention heads.
        window_size: int or ``(wd, wh, ww)``. Default 4.
        relative_position_bias: add a learned relative position bias. Default True.
        qkv_bias: bias in the q/k/v projections. Default True.
        attn_drop: dropout on the attention weights. Default 0.
        proj_drop: dropout after the output projection. Default 0.
        fused_attention: see :class:`LocalWindowSelfAttention`. Default True.
    """

    def __init__(
        self,
        query_channels: int,
        context_channels: int,
        num_heads: int,
        window_size: Sequence[int] | int = 4,
        relative_position_bias: bool = True,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if query_channels < 1 or num_heads < 1 or query_channels % num_heads != 0:
            raise ValueError(
                f"query_channels ({query_channels}) must be a positive multiple of num_heads ({num_heads})."
            )
        if context_channels < 1:
            raise ValueError(f"context_channels must be positive, got {context_channels}.")
        self.window_size = _as_triple(window_size, "window_size")
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}.")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}.")
        self.query_channels = query_channels
        self.context_channels = context_channels
        self.num_heads = num_heads
        self.scale = float((query_channels // num_heads) ** -0.5)
        self.q = nn.Linear(query_channels, query_channels, bias=qkv_bias)
        self.kv = nn.Linear(context_channels, 2 * query_channels, bias=qkv_bias)
        self.proj = nn.Linear(query_channels, query_channels)
        self.attn_drop = float(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.position_bias: RelativePositionBias | None = (
            RelativePositionBias(self.window_size, num_heads) if relative_position_bias else None
        )
        self.fused_attention = bool(fused_attention)

    @staticmethod
    def _group_windows(x: torch.Tensor, window: list[int]) -> tuple[torch.Tensor, list[int]]:
        """``(B, G, C, D, H, W) -> (B * nW, G * N, C)`` (group-major inside a window) and the padded size."""
        b, g, c, d, h, w = x.shape
        tokens, padded = _pad_to_windows(x.reshape(b * g, c, d, h, w).permute(0, 2, 3, 4, 1), window)
        tokens = window_partition(tokens, window)  # (B * G * nW, N, C)
        n_windows = tokens.shape[0] // (b * g)
        n = tokens.shape[1]
        tokens = tokens.view(b, g, n_windows, n, c).permute(0, 2, 1, 3, 4).reshape(b * n_windows, g * n, c)
        return tokens, padded

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, value_gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, Gq, Cq, D, H, W), (B, Gk, Ck, D, H, W) -> (B, Gq, Cq, D, H, W)``; ``value_gate``: None or
        ``(B, Cq)``, multiplied into the values channel by channel (the same for every token)."""
        return self._attend(query, context, value_gate, False)[0]

    def forward_with_weights(
        self, query: torch.Tensor, context: torch.Tensor, value_gate: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward`` and also return the weights ``(B * nW, heads, Gq * N, Gk * N)`` (before dropout)."""
        out, weights = self._attend(query, context, value_gate, True)
        assert weights is not None  # need_weights=True always takes the explicit path
        return out, weights

    def _attend(
        self, query: torch.Tensor, context: torch.Tensor, value_gate: torch.Tensor | None, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.dim() != 6 or query.shape[2] != self.query_channels:
            raise ValueError(f"expected query (B, Gq, {self.query_channels}, D, H, W), got {list(query.shape)}.")
        if context.dim() != 6 or context.shape[2] != self.context_channels:
            raise ValueError(f"expected context (B, Gk, {self.context_channels}, D, H, W), got {list(context.shape)}.")
        if query.shape[0] != context.shape[0] or query.shape[3:] != context.shape[3:]:
            raise ValueError(
                f"query {list(query.shape)} and context {list(context.shape)} need the same batch and spatial size."
            )
        b, gq, cq, d, h, w = query.shape
        gk = context.shape[1]
        window, _ = effective_window([d, h, w], self.window_size, [0, 0, 0])
        q_tokens, padded = self._group_windows(query, window)  # (B * nW, Gq * N, Cq)
        kv_tokens, _ = self._group_windows(context, window)  # (B * nW, Gk * N, Ck)
        bnw, nq, _ = q_tokens.shape
        nk = kv_tokens.shape[1]
        n = nq // gq
        heads = self.num_heads
        n_windows = bnw // b
        q = self.q(q_tokens).reshape(bnw, nq, heads, cq // heads).transpose(1, 2)
        kv = self.kv(kv_tokens).reshape(bnw, nk, 2, heads, cq // heads).permute(2, 0, 3, 1, 4)
        v = kv[1]
        if value_gate is not None:
            if value_gate.dim() != 2 or value_gate.shape[0] != b or value_gate.shape[1] != cq:
                raise ValueError(f"value_gate must be (B, Cq) = ({b}, {cq}), got {list(value_gate.shape)}.")
            # (B, Cq) -> (B * nW, heads, 1, Cq / heads); windows are batch-major
            v = v * value_gate.reshape(b, heads, 1, cq // heads).repeat_interleave(n_windows, dim=0)
        mask: torch.Tensor | None = None
        if padded != [d, h, w]:
            regions, valid = window_token_regions(padded, window, [0, 0, 0], [d, h, w], query.device)
            mask = window_attention_mask(
                regions.repeat(1, gq), valid.repeat(1, gq), regions.repeat(1, gk), valid.repeat(1, gk)
            )
        bias: torch.Tensor | None = None
        if self.position_bias is not None:
            bias = self.position_bias(window).repeat(1, gq, gk)
        drop = self.attn_drop if self.training else 0.0
        out, weights = attend_in_windows(q, kv[0], v, self.scale, bias, mask, drop, self.fused_attention, need_weights)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(bnw, nq, cq)))
        # (B * nW, Gq * N, Cq) -> (B * Gq * nW, N, Cq) -> (B * Gq, Dp, Hp, Wp, Cq)
        out = out.view(b, n_windows, gq, n, cq).permute(0, 2, 1, 3, 4).reshape(b * gq * n_windows, n, cq)
        out = window_reverse(out, window, padded)[:, :d, :h, :w, :]
        out = out.permute(0, 4, 1, 2, 3).reshape(b, gq, cq, d, h, w)
        return out, weights


class LocalWindowTransformerBlock(nn.Module):
    """Pre-norm transformer block around :class:`LocalWindowSelfAttention`: ``(B, C, D, H, W) -> (B, C, D, H, W)``.

    ``x = x + LWSA(LN(x)); x = x + MLP(LN(x))``, LayerNorm over channels, MONAI's ``MLPBlock``
    (GELU, hidden ``mlp_ratio * C``). Blocks with and without ``shift_size`` alternate in
    Swin-style stages.

    Args:
        dim: channels ``C``.
        num_heads: attention heads.
        window_size: int or ``(wd, wh, ww)``. Default 4.
        shift_size: int or ``(sd, sh, sw)``. Default 0.
        relative_position_bias: see :class:`LocalWindowSelfAttention`. Default True.
        mlp_ratio: MLP hidden width over ``dim``. Default 4.
        dropout: dropout in attention weights, projection and MLP. Default 0.
        fused_attention: see :class:`LocalWindowSelfAttention`. Default True.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int] | int = 4,
        shift_size: Sequence[int] | int = 0,
        relative_position_bias: bool = True,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LocalWindowSelfAttention(
            dim,
            num_heads,
            window_size=window_size,
            shift_size=shift_size,
            relative_position_bias=relative_position_bias,
            attn_drop=dropout,
            proj_drop=dropout,
            fused_attention=fused_attention,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, max(1, int(dim * mlp_ratio)), dropout_rate=dropout, act="GELU", dropout_mode="swin")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C, D, H, W)``."""
        x = x + self.attn(self.norm1(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3))
        y = x.permute(0, 2, 3, 4, 1)
        return (y + self.mlp(self.norm2(y))).permute(0, 4, 1, 2, 3).contiguous()
