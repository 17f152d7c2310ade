"""Tests for common/engines/distributed.py: the device of a single process and of a torchrun rank, the backend, DDP's
device ids, joining and leaving a (gloo) process group, and what runs on rank 0 only."""

from __future__ import annotations

import socket

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist

from common.engines import distributed
from common.engines.distributed import (
    ddp_device_ids,
    default_device,
    distributed_backend,
    finalize_distributed,
    init_distributed,
    is_rank_zero,
    local_rank_device,
    on_cuda,
    on_rank_zero,
    rank_zero_handlers,
    set_cpu_threads,
)


@pytest.fixture(params=[False, True], ids=["cpu", "cuda"])
def cuda(request, monkeypatch):
    """Whether CUDA is (pretended to be) available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: request.param)
    return request.param


@pytest.fixture
def rank(monkeypatch):
    """Pretend to be rank ``r`` of an initialised process group: ``rank(r)``; ``rank(None)``: no process group."""

    def set_rank(r):
        monkeypatch.setattr(dist, "is_initialized", lambda: r is not None)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: r)

    return set_rank


def test_devices_backend_and_ddp_ids(cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda:0" if cuda else "cpu")
    assert local_rank_device() == torch.device("cuda:3" if cuda else "cpu")
    assert distributed_backend() == ("nccl" if cuda else "gloo")
    device = torch.device("cuda:3")
    assert ddp_device_ids(device) == ([device] if cuda else None)
    monkeypatch.delenv("LOCAL_RANK")
    if not cuda:
        assert local_rank_device() == torch.device("cpu")  # a CPU run needs no LOCAL_RANK
    else:
        with pytest.raises(KeyError, match="LOCAL_RANK"):
            local_rank_device()


def test_rank_zero_handlers_drop_the_last_ones_on_other_ranks(rank):
    handlers = ["checkpoint", "validation", "stats", "tensorboard"]
    rank(None)
    assert rank_zero_handlers(handlers, 2) == handlers and is_rank_zero()
    rank(0)
    assert rank_zero_handlers(handlers, 2) == handlers and is_rank_zero()
    rank(1)
    assert not is_rank_zero()
    assert rank_zero_handlers(handlers, 2) == ["checkpoint", "validation"]
    assert rank_zero_handlers(handlers, 0) == handlers  # not handlers[:-0], which is empty
    assert rank_zero_handlers(tuple(handlers), 4) == []
    with pytest.raises(ValueError, match="n_rank0_only must be >= 0"):
        rank_zero_handlers(handlers, -1)


def test_on_rank_zero(rank):
    handlers, lr = ["stats", "saver"], ["lr_scheduler"]
    rank(None)
    assert on_rank_zero(handlers) is handlers
    rank(0)
    assert on_rank_zero(handlers, lr) is handlers
    rank(2)
    assert on_rank_zero(handlers) is None and on_rank_zero(handlers, lr) is lr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_and_finalize_a_process_group(monkeypatch):
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    set_devices = []
    monkeypatch.setattr(torch.cuda, "set_device", set_devices.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    finalize_distributed()  # no process group: nothing to do
    assert not dist.is_initialized()
    try:
        init_distributed("gloo", torch.device("cpu"))
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        init_distributed("gloo", torch.device("cpu"))  # already joined (a launcher did it): no second group
        assert set_devices == []  # the CPU has no current device to set
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        init_distributed("nccl", torch.device("cuda:1"))
        assert set_devices == [torch.device("cuda:1")] and dist.get_backend() == "gloo"
        barriers = []
        monkeypatch.setattr(distributed.dist, "barrier", lambda: barriers.append(1))
        finalize_distributed()
        assert barriers == [1] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        idist.sync()  # ignite's model must not outlive the group (MONAI's metrics gather through it)


def test_on_cuda_and_set_cpu_threads():
    assert on_cuda(torch.device("cuda:1"), 64, 2) == 64
    assert on_cuda("cuda", 64, 2) == 64
    assert on_cuda(torch.device("cpu"), 64, 2) == 2
    threads = torch.get_num_threads()
    try:
        other = 2 if threads != 2 else 1
        set_cpu_threads(other)
        assert torch.get_num_threads() == other
        set_cpu_threads(None)  # the default: torch's own
        set_cpu_threads(0)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(threads)
