"""Activation (gradient) checkpointing of a network stage that leaves batch-norm statistics as without it.

``torch.utils.checkpoint.checkpoint`` stores only a stage's inputs and recomputes its activations during the
backward pass: at large ROIs the stored activations dominate training memory, at the cost of one more forward of
the stage. The recomputation runs the stage in training mode a second time, so a plain checkpoint updates the
running statistics of every batch norm inside it twice per step (momentum 0.1: the running mean moves by
``1 - 0.9^2 = 0.19`` of the gap instead of 0.1), and evaluation then differs from a run without checkpointing.
:func:`checkpoint_stage` freezes those statistics during the recomputation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_stage"]


@contextlib.contextmanager
def _frozen_batch_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Batch norms inside ``module`` normalise with batch statistics as usual but keep their running ones."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def checkpoint_stage(stage: nn.Module, *inputs: torch.Tensor) -> Any:
    """``stage(*inputs)`` with its activations recomputed in backward instead of stored.

    Non-reentrant ``torch.utils.checkpoint`` (the RNG state is replayed, so dropout draws the same mask twice);
    batch-norm running statistics are updated once per step, as without checkpointing. Call it only in training
    with gradients enabled (it is slower and saves nothing otherwise); networks take it behind
    ``torch.jit.is_scripting()`` checks, as TorchScript cannot compile it.
    """
    return checkpoint(
        stage,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _frozen_batch_norm_statistics(stage)),
    )
