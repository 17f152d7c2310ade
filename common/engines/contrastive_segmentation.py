"""The TransUNet epoch of the COVID-19 pipeline: a contrastive phase, then a segmentation phase.

El Fahsi et al. (TransUNet on the 3D GAN pseudo-masks of Shabani et al., Computers in Biology and Medicine
2022): each epoch first pulls together the embeddings of slices with the same pseudo-lesion burden class
("high" / "low", :func:`common.data.pseudo_masks.slice_classes`) with a supervised contrastive loss
(:mod:`common.losses.contrastive`), then trains the segmentation on the pseudo-masks with MSE + the
sensitivity-enhanced BCE (:class:`common.losses.contrastive.SegmentationLoss`). The total objective is
contrastive + MSE + sensitivity; both phases step the same optimiser (Adam), so one learning-rate schedule
(ReduceLROnPlateau on the validation metric, in the bundle) governs both.

Each phase steps only its own parameters: the contrastive phase the encoder and the projection head (the network's
``embed`` does not run the decoder), the segmentation phase the encoder, decoder and head (``forward`` does not run
the projection head). Gradients are reset to ``None``, never to zero, before every step (``optim_set_to_none`` is
forced): PyTorch's optimisers skip a parameter whose gradient is ``None``, but step one whose gradient is a zero
tensor, and Adam's momentum would then keep moving the decoder during the contrastive phase and the projection head
during the segmentation phase.

Why a subclass of MONAI's ``SupervisedTrainer``: the segmentation phase *is* a supervised epoch (its
iterations, events, metrics and handlers are MONAI's, unchanged); what MONAI has no place for is a second
loop over another loader, with another loss on another output of the network, at the start of every epoch.
It runs on ``Events.EPOCH_STARTED`` and reports its mean loss as ``engine.state.metrics["contrastive_loss"]``
(which ``StatsHandler`` prints at the end of the epoch).

Distributed training: with a ``DistributedDataParallel`` network the contrastive phase calls the wrapped
module's ``embed`` (DDP only wraps ``forward``), averages the gradients over the ranks itself
before each step and, at the end of the phase, broadcasts the buffers (batch-norm statistics) of rank 0, as DDP's
forward does; the contrastive batch sampler must give every rank the same number of batches
(:class:`common.data.slices.BalancedClassBatchSampler` does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import Inferer
from monai.transforms import Transform
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.data.mosmed import with_reference_masks

__all__ = ["MODEL_SELECTIONS", "ContrastiveSegmentationTrainer", "check_model_selection", "validation_studies"]

#: how the bundle's TransUNet training picks its model (config id ``model_selection``):
#: ``"validation"``: the reference masks of the ``validation`` studies drive ReduceLROnPlateau and the saved model
#: is the best validation Dice (the default, as the pipeline is published); ``"final"``: no reference mask is
#: used at all, the learning rate stays fixed and the saved model is the last epoch's, as a method sold as needing
#: no manual masks must be trainable.
MODEL_SELECTIONS: tuple[str, ...] = ("validation", "final")


def check_model_selection(value: str) -> str:
    """``value`` if it is one of :data:`MODEL_SELECTIONS`; else ``ValueError`` (a typo must not fall back)."""
    if value not in MODEL_SELECTIONS:
        raise ValueError(f"model_selection must be one of {MODEL_SELECTIONS}, got {value!r}")
    return value


def validation_studies(
    items: Sequence[Mapping[str, Any]], source: str | os.PathLike, model_selection: str
) -> list[dict[str, Any]]:
    """The studies the TransUNet validates on: those with a reference mask (``"validation"``), or none (``"final"``).

    With ``"final"`` not even the masks' paths are passed on, so no reference mask is read during training.

    Raises:
        ValueError: an unknown ``model_selection``.
        DataError: ``"validation"`` and no study of ``items`` has a mask (see
            :func:`common.data.mosmed.with_reference_masks`).
    """
    if check_model_selection(model_selection) == "final":
        return []
    return with_reference_masks(items, source)


class ContrastiveSegmentationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose every epoch starts with a contrastive phase over ``contrastive_data_loader``.

    Contrastive phase, for each batch ``{image_key: (B, C, H, W), class_key: (B,)}`` of the contrastive loader:
    ``z = network.embed(image)`` (``(B, proj_dim)``), loss
    ``contrastive_weight * contrastive_loss_function(z, classes)``, one optimiser step. Then the usual
    supervised epoch over ``train_data_loader`` with ``loss_function`` (e.g. MSE + sensitivity-enhanced BCE
    on the pseudo-masks).

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function: as ``SupervisedTrainer``;
            ``network`` must have ``embed(x) -> (B, proj_dim)`` (e.g.
            :class:`common.networks.transunet.TransUNet`), possibly wrapped in ``DistributedDataParallel``.
        contrastive_data_loader: batches holding both classes (see
            :class:`common.data.slices.BalancedClassBatchSampler`), or ``None`` to skip the phase.
        contrastive_loss_function: ``loss(z (B, D), classes (B,)) -> scalar``, e.g.
            :class:`common.losses.contrastive.EnhancedSupConLoss`.
        contrastive_weight: weight of the contrastive term, >= 0. Default 1.
        image_key: key of the slices in the contrastive batches. Default ``"image"``.
        class_key: key of the slice classes in the contrastive batches. Default ``"slice_class"``.
        optim_set_to_none: must be True (the default here): see the module docstring.
        other arguments: as MONAI's ``SupervisedTrainer``.

    Raises:
        ValueError: ``contrastive_data_loader`` without ``contrastive_loss_function``, a negative weight, a
            network without ``embed``, or ``optim_set_to_none=False``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        contrastive_data_loader: Iterable | DataLoader | None = None,
        contrastive_loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        contrastive_weight: float = 1.0,
        image_key: str = "image",
        class_key: str = "slice_class",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        decollate: bool = True,
        optim_set_to_none: bool = True,
        amp_kwargs: dict | None = None,
    ) -> None:
        if contrastive_data_loader is not None and contrastive_loss_function is None:
            raise ValueError("a contrastive_data_loader needs a contrastive_loss_function")
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        if not optim_set_to_none:
            raise ValueError(
                "optim_set_to_none=False would step every parameter with a zero gradient: Adam's momentum would move "
                "the decoder in the contrastive phase and the projection head in the segmentation phase"
            )
        module = network.module if isinstance(network, DistributedDataParallel) else network
        if contrastive_data_loader is not None and not callable(getattr(module, "embed", None)):
            raise ValueError(f"{type(module).__name__} has no embed(x) -> (B, proj_dim) embedding")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            inferer=inferer,
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            additional_metrics=additional_metrics,
            train_handlers=train_handlers,
            amp=amp,
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            amp_kwargs=amp_kwargs,
        )
        self.contrastive_data_loader = contrastive_data_loader
        self.contrastive_loss_function = contrastive_loss_function
        self.contrastive_weight = float(contrastive_weight)
        self.image_key = image_key
        self.class_key = class_key
        if contrastive_data_loader is not None:
            self.add_event_handler(Events.EPOCH_STARTED, self._contrastive_phase)

    def _contrastive_phase(self, engine: ContrastiveSegmentationTrainer) -> None:
        """One pass over the contrastive loader; the mean loss goes to ``engine.state.metrics``."""
        network = engine.network
        ddp = isinstance(network, DistributedDataParallel)
        module: Any = network.module if ddp else network
        sampler = getattr(engine.contrastive_data_loader, "batch_sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(engine.state.epoch)
        module.train()
        total, steps = 0.0, 0
        for batch in engine.contrastive_data_loader:
            images = torch.as_tensor(batch[engine.image_key]).to(engine.state.device, non_blocking=engine.non_blocking)
            classes = torch.as_tensor(batch[engine.class_key]).to(engine.state.device, non_blocking=engine.non_blocking)
            engine.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext():
                embedding = module.embed(images)
            loss = engine.contrastive_weight * engine.contrastive_loss_function(embedding.float(), classes)
            if engine.amp and engine.scaler is not None:
                _backward(engine.scaler.scale(loss), module, ddp)
                if ddp:
                    engine.scaler.unscale_(engine.optimizer)
                    _average_gradients(module)
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                _backward(loss, module, ddp)
                if ddp:
                    _average_gradients(module)
                engine.optimizer.step()
            total += loss.item()
            steps += 1
        if steps == 0:
            raise ValueError("the contrastive data loader yielded no batch")
        if ddp and network.broadcast_buffers:
            # as DDP's own forward does: batch-norm statistics of rank 0 everywhere, so the ranks stay identical
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)
        engine.state.metrics["contrastive_loss"] = total / steps


def _backward(loss: torch.Tensor, module: nn.Module, ddp: bool) -> None:
    """``loss.backward()``; under DDP through ``torch.autograd.grad`` instead, written to ``.grad``.

    ``embed`` bypasses DDP's ``forward``, so DDP's reducer was not prepared for this backward: its per-parameter
    hooks, which fire when ``backward`` accumulates into ``.grad``, would all-reduce undefined gradients (a
    RuntimeError). ``autograd.grad`` does not run those hooks; parameters ``embed`` does not use keep ``grad=None``.
    """
    if not ddp:
        loss.backward()
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of ``module`` over the default process group."""
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)
