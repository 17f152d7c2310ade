"""Mixed precision, memory layout and compilation of a bundle's network, as config switches.

Every bundle's train and inference configs build their network as::

    "network": "$prepare_network(@network_def, @device, amp=@amp, amp_dtype=@amp_dtype,
                                 channels_last=@channels_last, compile=@compile)"

and hand ``"amp_kwargs": "$autocast_kwargs(@amp_dtype, @device)"`` to MONAI's trainers and evaluators, so that
``--amp true --amp_dtype bfloat16``, ``--channels_last true`` and ``--compile true`` switch these on from the
command line. Why the network itself carries the autocast: MONAI's engines enter ``torch.autocast("cuda")`` only,
so they never autocast on the CPU (where bf16 autocast measured about 3x faster for HLWA-UNet and SegResNet
training on a CPU with AMX), and the collection's GAN trainer has no AMP at all; hooks on the network put every
engine's forward under the same autocast on either device. Hooks rather than a wrapper module, because a wrapper
would prefix every key of the state dict (checkpoints, ``ckpt_export``, MONAI Label load the bare network) and
would not be what the configs' EMA handler copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AMP_DTYPES", "autocast_dtype", "autocast_kwargs", "prepare_network"]

#: names accepted for ``amp_dtype`` ("auto": bfloat16 on the CPU and on GPUs that support it, else float16)
AMP_DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def autocast_dtype(amp_dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The autocast dtype that ``amp_dtype`` means on ``device``.

    ``"auto"`` is bfloat16 on the CPU and on CUDA devices that support it (Ampere and later), float16 on older
    GPUs. bfloat16 keeps float32's exponent range, so it needs no loss scaling; float16 on CUDA needs the
    ``GradScaler`` that MONAI's trainers create when ``amp`` is on.
    """
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be bfloat16 or float16, got {amp_dtype}.")
        return amp_dtype
    key = str(amp_dtype).lower()
    if key not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}.")
    dtype = AMP_DTYPES[key]
    if dtype is not None:
        return dtype
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast_kwargs(amp_dtype: str | torch.dtype, device: torch.device | str) -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` for the ``amp_kwargs`` of MONAI's engines (their own CUDA autocast of the loss)."""
    return {"dtype": autocast_dtype(amp_dtype, device)}


def _memory_format(network: nn.Module) -> torch.memory_format | None:
    """``channels_last_3d`` for a network of 3D convolutions, ``channels_last`` for 2D ones, None without."""
    ranks = {p.dim() for p in network.parameters() if p.dim() in (4, 5)}
    if len(ranks) > 1:
        raise ValueError("channels_last: the network mixes 2D and 3D convolution weights; convert it by hand.")
    if not ranks:
        return None
    return torch.channels_last_3d if ranks == {5} else torch.channels_last


def _float32(output: Any) -> Any:
    """Floating tensors of an output (a tensor, or a tuple/list/dict of them) back to float32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        return type(output)(_float32(o) for o in output)
    if isinstance(output, dict):
        return {k: _float32(v) for k, v in output.items()}
    return output


def _install_hooks(
    network: nn.Module, device_type: str, dtype: torch.dtype | None, fmt: torch.memory_format | None, plain: bool
) -> None:
    """Forward hooks: inputs to ``fmt``, MetaTensors to plain tensors (``plain``, for ``torch.compile``), the
    forward under ``torch.autocast(device_type, dtype)`` with float32 outputs (``dtype``).

    The hooks are excluded from ``torch.compile`` (``torch._dynamo.disable``): dynamo cannot trace an autocast
    entered in one function and left in another, and it compiles the forward under the autocast state they set.
    """
    from monai.data import MetaTensor

    rank = 5 if fmt is torch.channels_last_3d else 4
    active: list[tuple[torch.autocast | None, MetaTensor | None]] = []  # one entry per call in progress

    def convert(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if plain and isinstance(value, MetaTensor):
            value = value.as_tensor()
        if fmt is not None and value.dim() == rank:
            value = value.contiguous(memory_format=fmt)
        return value

    @torch._dynamo.disable
    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        meta = next((a for a in args if isinstance(a, MetaTensor)), None) if plain else None
        context = torch.autocast(device_type, dtype=dtype) if dtype is not None else None
        args, kwargs = tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}
        if context is not None:
            context.__enter__()
        active.append((context, meta))
        return args, kwargs

    @torch._dynamo.disable
    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        context, meta = active.pop()
        if context is not None:
            context.__exit__(None, None, None)
            output = _float32(output)
        if meta is not None and isinstance(output, torch.Tensor):  # what MONAI's engines do after compiled calls
            output = MetaTensor(output, meta=meta.meta, applied_operations=meta.applied_operations)
        return output

    network.register_forward_pre_hook(before, with_kwargs=True)
    network.register_forward_hook(after, with_kwargs=True, always_call=True)


def prepare_network(
    network: nn.Module,
    device: torch.device | str | None = None,
    amp: bool = False,
    amp_dtype: str | torch.dtype = "auto",
    channels_last: bool = False,
    compile: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Move ``network`` to ``device`` and switch on mixed precision, channels-last memory and compilation, in place.

    Args:
        network: the bundle's ``network_def``.
        device: where it runs (default: where its parameters are).
        amp: run its forward under ``torch.autocast(device.type, autocast_dtype(amp_dtype, device))`` on the CPU
            and on CUDA, outputs returned as float32 (losses and metrics stay in float32). Default False.
        amp_dtype: ``"auto"``, ``"bfloat16"`` or ``"float16"`` (:func:`autocast_dtype`). Default ``"auto"``.
        channels_last: store convolution weights and inputs channels-last (``channels_last_3d`` for 3D networks,
            ``channels_last`` for 2D ones). Default False.
        compile: ``network.compile(**compile_kwargs)`` (``torch.compile`` of its call, in place: the state dict and
            the object stay the same, so checkpoints and EMA copies work as without). MetaTensor inputs are passed
            as plain tensors and a tensor output gets the input's metadata back, as MONAI's engines do for a
            compiled network. Default False.
        compile_kwargs: arguments of ``torch.compile``.

    Returns:
        ``network`` itself.

    Raises:
        ValueError: a switch that is not a bool: ``--amp false`` on ``monai.bundle run``'s command line arrives as
            the (true) string ``"false"``; write ``--amp False``.
    """
    for name, value in (("amp", amp), ("channels_last", channels_last), ("compile", compile)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r} (on the command line: --{name} False).")
    if device is not None:
        network = network.to(device)
    params = list(network.parameters())
    dev = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    fmt = _memory_format(network) if channels_last else None
    if fmt is not None:
        network = network.to(memory_format=fmt)
    dtype = autocast_dtype(amp_dtype, dev) if amp else None
    if fmt is not None or dtype is not None or compile:
        _install_hooks(network, dev.type, dtype, fmt, plain=compile)
    if compile:
        network.compile(**(compile_kwargs or {}))
    return network
