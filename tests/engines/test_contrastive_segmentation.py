"""Tests for common/engines/contrastive_segmentation.py (tiny TransUNet on 16 x 16 slices)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from torch.utils.data import DataLoader

from common.data.slices import BalancedClassBatchSampler
from common.engines.contrastive_segmentation import ContrastiveSegmentationTrainer
from common.losses.contrastive import EnhancedSupConLoss, SegmentationLoss
from common.networks.transunet import TransUNet

TINY = dict(
    img_size=16,
    stem_channels=4,
    encoder_channels=(8, 8, 16),
    vit_layers=1,
    vit_heads=2,
    vit_mlp_dim=8,
    hidden_size=8,
    head_channels=8,
    decoder_channels=(8, 4, 4, 4),
    proj_dim=4,
)


def slices(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.rand(1, 16, 16, generator=g),
            "label": (torch.rand(1, 16, 16, generator=g) > 0.8).float(),
            "slice_class": torch.tensor(i % 2),
        }
        for i in range(n)
    ]


class RecordingLoss(nn.Module):
    """The enhanced contrastive loss, recording the shapes and classes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], list[int]]] = []
        self.loss = EnhancedSupConLoss(temperature=0.5)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(z.shape), labels.tolist()))
        return self.loss(z, labels)


def make_trainer(network: nn.Module, contrastive: nn.Module | None, epochs: int = 1) -> ContrastiveSegmentationTrainer:
    data = slices(8, 0)
    sampler = BalancedClassBatchSampler([int(d["slice_class"]) for d in data], batch_size=4, seed=0)
    return ContrastiveSegmentationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=DataLoader(data, batch_size=4),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=SegmentationLoss(),
        contrastive_data_loader=DataLoader(data, batch_sampler=sampler) if contrastive is not None else None,
        contrastive_loss_function=contrastive,
    )


def test_each_epoch_runs_the_contrastive_phase_first_on_both_classes():
    torch.manual_seed(0)
    net = TransUNet(**TINY)
    loss = RecordingLoss()
    trainer = make_trainer(net, loss, epochs=2)
    order: list[str] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: order.append(f"seg{len(loss.calls)}"))
    before = copy.deepcopy(net.state_dict())
    trainer.run()
    # 2 contrastive batches (4 per class // 2 per batch) then 2 segmentation iterations, in every epoch
    assert order == ["seg2", "seg2", "seg4", "seg4"]
    assert all(shape == (4, 4) and sorted(labels) == [0, 0, 1, 1] for shape, labels in loss.calls)
    assert trainer.state.metrics["contrastive_loss"] > 0
    assert not torch.equal(before["projection.2.weight"], net.state_dict()["projection.2.weight"])


def test_contrastive_phase_trains_the_encoder_only_through_the_embedding():
    torch.manual_seed(0)
    net = TransUNet(**TINY)
    trainer = make_trainer(net, EnhancedSupConLoss(temperature=0.5))
    head = net.segmentation_head.weight.detach().clone()
    stem = net.stem.conv.weight.detach().clone()
    trainer._contrastive_phase(trainer)  # the phase alone, outside a run
    assert torch.equal(head, net.segmentation_head.weight) and not torch.equal(stem, net.stem.conv.weight)


def test_each_phase_steps_only_its_own_parameters():
    """Adam with one optimiser over the whole network, two epochs: the contrastive phase must leave the decoder (its
    weights and batch-norm statistics) exactly as it was, the segmentation phase the projection head; both move the
    shared encoder. With zero (rather than no) gradients, Adam's momentum moves the idle part from epoch 2 on."""
    torch.manual_seed(0)
    net = TransUNet(**TINY)
    trainer = make_trainer(net, EnhancedSupConLoss(temperature=0.5), epochs=2)
    snapshots: list[tuple[str, dict]] = []

    def snap(name: str):
        return lambda engine: snapshots.append((f"{name}{engine.state.epoch}", copy.deepcopy(net.state_dict())))

    trainer.add_event_handler(Events.STARTED, snap("start"))
    trainer.add_event_handler(Events.EPOCH_STARTED, snap("after_contrastive"))  # runs after the phase's handler
    trainer.add_event_handler(Events.EPOCH_COMPLETED, snap("after_segmentation"))
    trainer.run()
    names = [n for n, _ in snapshots]
    assert names == ["start0", "after_contrastive1", "after_segmentation1", "after_contrastive2", "after_segmentation2"]
    states = [s for _, s in snapshots]

    def changed(a: dict, b: dict, prefixes: tuple[str, ...]) -> list[str]:
        return [k for k in a if k.startswith(prefixes) and not torch.equal(a[k], b[k])]

    decoder, projection, encoder = ("conv_more", "decoder", "segmentation_head"), ("projection",), ("stem", "stage1")
    for before, after in ((0, 1), (2, 3)):  # contrastive phases of epochs 1 and 2
        assert changed(states[before], states[after], decoder) == []
        assert changed(states[before], states[after], encoder)
    for before, after in ((1, 2), (3, 4)):  # segmentation phases
        assert changed(states[before], states[after], projection) == []
        assert changed(states[before], states[after], encoder)


def test_invalid_arguments():
    net = TransUNet(**TINY)
    with pytest.raises(ValueError, match="contrastive_loss_function"):
        make_trainer(net, None).__class__(
            "cpu",
            1,
            DataLoader(slices(2, 0)),
            net,
            torch.optim.Adam(net.parameters()),
            SegmentationLoss(),
            contrastive_data_loader=DataLoader(slices(2, 0)),
        )
    with pytest.raises(ValueError, match="embed"):
        make_trainer(nn.Conv2d(1, 1, 1), EnhancedSupConLoss())
    with pytest.raises(ValueError, match="optim_set_to_none"):
        ContrastiveSegmentationTrainer(
            "cpu",
            1,
            DataLoader(slices(2, 0)),
            net,
            torch.optim.Adam(net.parameters()),
            SegmentationLoss(),
            optim_set_to_none=False,
        )
    no_phase = make_trainer(TransUNet(**TINY), None)
    no_phase.run()
    assert "contrastive_loss" not in no_phase.state.metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# run in two subprocesses (a spawned multiprocessing target must be importable by name, and pytest's importlib
# mode gives test modules no importable name)
_DDP_WORKER = """
import sys, torch, torch.distributed as dist, torch.nn as nn
from torch.utils.data import DataLoader
sys.path.insert(0, sys.argv[4])
from common.data.slices import BalancedClassBatchSampler
from common.engines.contrastive_segmentation import ContrastiveSegmentationTrainer
from common.losses.contrastive import EnhancedSupConLoss, SegmentationLoss
from common.networks.transunet import TransUNet
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tiny, data = torch.load(sys.argv[5])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=2)
torch.manual_seed(0)
net = nn.parallel.DistributedDataParallel(TransUNet(**tiny), find_unused_parameters=True)
sampler = BalancedClassBatchSampler([int(d["slice_class"]) for d in data], 4, num_replicas=2, rank=rank)
trainer = ContrastiveSegmentationTrainer(
    "cpu", 1, DataLoader(data, batch_size=4), net, torch.optim.SGD(net.parameters(), lr=0.1), SegmentationLoss(),
    contrastive_data_loader=DataLoader(data, batch_sampler=sampler),
    contrastive_loss_function=EnhancedSupConLoss(temperature=0.5),
)
trainer._contrastive_phase(trainer)
torch.save(net.module.state_dict(), out)
dist.destroy_process_group()
"""


def test_distributed_contrastive_phase_keeps_the_ranks_in_sync(tmp_path):
    """Two gloo ranks see different contrastive batches; the averaged gradients leave identical weights."""
    tiny = {**TINY, "dropout_rate": 0.0}
    torch.save((tiny, slices(8, 0)), tmp_path / "inputs.pt")
    port = str(_free_port())
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _DDP_WORKER,
                str(r),
                port,
                str(tmp_path / f"rank{r}.pt"),
                repo,
                str(tmp_path / "inputs.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    initial = TransUNet(**tiny).state_dict()
    moved = False
    for name, value in ranks[0].items():
        torch.testing.assert_close(value, ranks[1][name])
        moved |= not torch.equal(value, initial[name])
    assert moved
