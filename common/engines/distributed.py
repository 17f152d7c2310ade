"""The device and the ``torch.distributed`` set-up of a bundle run, as named calls for its configs.

A train or inference config picks its device with ``"device": "$default_device()"``; a ``multi_gpu_train.json``
(run under ``torchrun``, merged onto ``train.json``) sets up one process per GPU, or per CPU process with gloo::

    "device": "$local_rank_device()",
    "backend": "$distributed_backend()",
    "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": ...,
                "device_ids": "$ddp_device_ids(@device)"},
    "train#trainer#train_handlers": "$rank_zero_handlers(@train#handlers, 2)",
    "validate#evaluator#val_handlers": "$on_rank_zero(@validate#handlers)",
    "initialize": [..., "$init_distributed(@backend, @device)", ...],
    "finalize": ["$finalize_distributed()"]

as in the MONAI Model Zoo's multi-GPU configs, whose inline expressions these functions name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = [
    "ddp_device_ids",
    "default_device",
    "distributed_backend",
    "finalize_distributed",
    "init_distributed",
    "is_rank_zero",
    "local_rank_device",
    "on_cuda",
    "on_rank_zero",
    "rank_zero_handlers",
    "set_cpu_threads",
]


def default_device() -> torch.device:
    """``cuda:0`` when CUDA is available, else the CPU: the ``device`` of a single-process run."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def local_rank_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` (torchrun's variable) when CUDA is available, else the CPU: one GPU per process."""
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")


def on_cuda(device: torch.device | str, cuda_value: Any, cpu_value: Any) -> Any:
    """``cuda_value`` when ``device`` is a CUDA device, else ``cpu_value``: a setting that depends on the device
    (e.g. how many diffusion samples one network call takes: ``"$on_cuda(@device, 64, 2)"``)."""
    return cuda_value if str(device).startswith("cuda") else cpu_value


def set_cpu_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads(num_threads)``; nothing when ``num_threads`` is None or 0 (torch's default stays)."""
    if num_threads:
        torch.set_num_threads(num_threads)


def distributed_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"`` (the CPU backend, which the tests run under torchrun)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def ddp_device_ids(device: torch.device) -> list[torch.device] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[device]`` on CUDA, None on the CPU (as DDP requires)."""
    return [device] if torch.cuda.is_available() else None


def init_distributed(backend: str, device: torch.device) -> None:
    """Join the process group (unless this process has already) and, on CUDA, make ``device`` the current GPU.

    The rank and world size come from torchrun's environment (``init_method="env://"``, torch's default).
    """
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(device)


def finalize_distributed() -> None:
    """Wait for every rank, then leave the process group; nothing when there is none (a single process).

    ignite's computation model (``ignite.distributed``, which MONAI's metrics use to gather results) is re-synced,
    so that it does not keep referring to the destroyed group.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        idist.sync()


def is_rank_zero() -> bool:
    """Rank 0 of a ``torch.distributed`` job, or a single process (no process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def on_rank_zero(value: Any, otherwise: Any = None) -> Any:
    """``value`` on rank 0 (or in a single process), ``otherwise`` on the other ranks.

    E.g. an evaluator's handlers: only rank 0 logs and saves, the others run the validation without handlers
    (``otherwise=None``) or with the ones every rank needs, such as a learning-rate scheduler
    (``on_rank_zero(@validate#handlers, [@validate#lr_handler])``).
    """
    return value if is_rank_zero() else otherwise


def rank_zero_handlers(handlers: Sequence[Any], n_rank0_only: int) -> list[Any]:
    """``handlers`` on rank 0; on the other ranks without the last ``n_rank0_only`` (the loggers, which write
    the same lines and TensorBoard events once per rank otherwise).

    Args:
        handlers: a trainer's handlers, those every rank needs first (checkpointing, validation, schedulers).
        n_rank0_only: how many handlers at the end run on rank 0 only (>= 0).
    """
    if n_rank0_only < 0:
        raise ValueError(f"n_rank0_only must be >= 0, got {n_rank0_only}")
    handlers = list(handlers)
    return handlers if is_rank_zero() else handlers[: len(handlers) - n_rank0_only]
