"""One way to train under a budget: a bundle's own trainer, stopped after a number of steps or seconds.

Every benchmark of the collection trains through this function, so that each model is trained by the same engine
the bundle ships (its ``train#trainer``: network, loss, optimiser, transforms, data loader, and the training
handlers the method needs, such as MedSegDiff's EMA) and every result has the same schema:

.. code-block:: python

    {
        "model": str, "seed": int, "device": str, "torch_threads": int,
        "budget": {"max_steps": int | None, "max_seconds": float | None},
        "steps": int, "epochs": int,                 # optimiser steps (= iterations) and epochs started
        "train_seconds": float,                      # wall time of training, evaluations excluded
        "step_seconds_median": float,                # median wall time of one iteration (data loading included)
        "loss_first": float, "loss_last": float,     # mean loss of the first / last ``log_every`` iterations
        "loss_curve": [[steps, seconds, mean_loss], ...],
        "checkpoints": [{"steps": int, "seconds": float, "metrics": {...}}, ...],
        "stopped_by": "steps" | "seconds" | "epochs",
    }

``checkpoints`` are evaluations made during the run, at given training seconds or steps, with the clock
stopped while they run (an evaluation's cost does not eat into the training budget). One run therefore gives
a learning curve and the results at several budgets (e.g. 300, 600 and 1200 s), provided the learning-rate
schedule does not depend on the total budget.

Why not ignite's ``Engine.terminate`` from a MONAI handler in the config: the budget, the paused clock and the
checkpoints are the benchmark's, not the bundle's, and must not change the configs a user runs. Why not
MONAI's ``ValidationHandler``: it runs at epoch or iteration intervals, not at training-time marks, and its time
counts as training time.

:func:`cached_run` makes a benchmark resumable at the level of runs: a run whose result file exists is read back
instead of trained again.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.io import atomic_path

__all__ = ["BIG_EPOCHS", "cached_run", "train_with_budget"]

#: ``max_epochs`` given to the trainer when only a time budget is set (the budget stops it long before).
BIG_EPOCHS = 10**6


def _loss_of(output: Any) -> float:
    """The scalar loss of one iteration's output (MONAI trainers return a dict or a list of dicts)."""
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss", output.get("Loss", float("nan")))
    if isinstance(output, torch.Tensor):
        return float(output.detach().float().mean())
    return float(output)


def train_with_budget(
    parser: Any,
    *,
    model: str,
    seed: int = 0,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    max_epochs: int | None = None,
    checkpoint_seconds: Sequence[float] = (),
    checkpoint_steps: Sequence[int] = (),
    evaluate: Callable[[Any, Any], Mapping[str, Any]] | None = None,
    trainer_id: str = "train#trainer",
    keep_handlers: Sequence[str] = (),
    log_every: int = 10,
    progress: Callable[[str], None] | None = print,
    progress_seconds: float = 60.0,
) -> dict[str, Any]:
    """Train the bundle's own trainer (``parser[trainer_id]``) until the first budget is spent; see the module doc.

    Args:
        parser: a MONAI ``ConfigParser`` of the bundle's training config with the benchmark's data and overrides
            (e.g. from :func:`common.benchmarks.report.bundle_train_parser`); its trainer is built here, after
            seeding, so the network's initial weights depend on ``seed`` only.
        model: the name the result is filed under.
        seed: passed to ``monai.utils.set_determinism`` before the trainer (network, data order) is built.
        max_steps, max_seconds, max_epochs: budgets; training stops when the first is reached (at least one
            must be given). Steps are optimiser steps (trainer iterations); seconds are training wall time.
        checkpoint_seconds, checkpoint_steps: when to call ``evaluate`` (each mark once, with the clock stopped);
            a final checkpoint is always taken at the end of training when ``evaluate`` is given.
        evaluate: ``evaluate(parser, trainer) -> metrics`` (e.g. held-out Dice of ``parser["network"]``); it must
            leave the network in training mode or the trainer sets it back (MONAI's trainer calls ``train()``
            every iteration).
        trainer_id: config id of the ignite engine to run.
        keep_handlers: config ids of training handlers to keep attached (e.g. ``"ema_handler"``); the config's
            others (validation, checkpoint savers, TensorBoard) are dropped, since the benchmark evaluates itself.
        log_every: iterations per point of ``loss_curve``.
        progress: called with a progress line about every ``progress_seconds`` of training and at each checkpoint.
    """
    from ignite.engine import Events
    from monai.utils import set_determinism

    if max_steps is None and max_seconds is None and max_epochs is None:
        raise ValueError("train_with_budget needs max_steps, max_seconds or max_epochs")
    say = progress or (lambda _msg: None)
    set_determinism(seed=seed)
    torch.manual_seed(seed)
    parser[trainer_id + "#train_handlers"] = "$[" + ", ".join(f"@{h}" for h in keep_handlers) + "]"
    epochs = max_epochs if max_epochs is not None else BIG_EPOCHS
    parser[trainer_id + "#max_epochs"] = epochs
    trainer = parser.get_parsed_content(trainer_id)

    marks_s = sorted(float(s) for s in checkpoint_seconds)
    marks_n = sorted(int(n) for n in checkpoint_steps)
    state: dict[str, Any] = {
        "train_seconds": 0.0,
        "resumed_at": None,
        "iter_started": None,
        "last_progress": 0.0,
        "stopped_by": "epochs",
    }
    step_times: list[float] = []
    losses: list[float] = []
    curve: list[list[float]] = []
    checkpoints: list[dict[str, Any]] = []

    def clock() -> float:
        running = 0.0 if state["resumed_at"] is None else time.perf_counter() - state["resumed_at"]
        return state["train_seconds"] + running

    def pause() -> None:
        state["train_seconds"] = clock()
        state["resumed_at"] = None

    def resume() -> None:
        state["resumed_at"] = time.perf_counter()

    def checkpoint(engine: Any, why: str, then_resume: bool = True) -> None:
        if evaluate is None:
            return
        pause()
        t0 = time.perf_counter()
        metrics = dict(evaluate(parser, engine))
        entry = {"steps": engine.state.iteration, "seconds": state["train_seconds"], "metrics": metrics}
        checkpoints.append(entry)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        say(
            f"[{model} seed {seed}] {why}: step {engine.state.iteration}, {state['train_seconds']:.0f} s: {shown} "
            f"(evaluation {time.perf_counter() - t0:.0f} s)"
        )
        if then_resume:
            resume()

    @trainer.on(Events.STARTED)
    def _started(engine: Any) -> None:
        resume()

    @trainer.on(Events.ITERATION_STARTED)
    def _iteration_started(engine: Any) -> None:
        state["iter_started"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _iteration_completed(engine: Any) -> None:
        step_times.append(time.perf_counter() - state["iter_started"])
        losses.append(_loss_of(engine.state.output))
        n = engine.state.iteration
        if n % log_every == 0:
            curve.append([n, clock(), float(np.mean(losses[-log_every:]))])
        seconds = clock()
        while marks_n and n >= marks_n[0]:
            marks_n.pop(0)
            checkpoint(engine, "checkpoint")
        while marks_s and seconds >= marks_s[0]:
            marks_s.pop(0)
            checkpoint(engine, "checkpoint")
        if seconds - state["last_progress"] >= progress_seconds:
            state["last_progress"] = seconds
            say(
                f"[{model} seed {seed}] step {n}, epoch {engine.state.epoch}, {seconds:.0f} s, "
                f"loss {float(np.mean(losses[-log_every:])):.4f}"
            )
        if max_steps is not None and n >= max_steps:
            state["stopped_by"] = "steps"
            engine.terminate()
        elif max_seconds is not None and clock() >= max_seconds:
            state["stopped_by"] = "seconds"
            engine.terminate()

    trainer.run()
    pause()
    if evaluate is not None and (not checkpoints or checkpoints[-1]["steps"] != trainer.state.iteration):
        checkpoint(trainer, "end of training", then_resume=False)
    head, tail = losses[:log_every], losses[-log_every:]
    return {
        "model": model,
        "seed": int(seed),
        "device": str(getattr(trainer, "device", "cpu")),
        "torch_threads": torch.get_num_threads(),
        "budget": {"max_steps": max_steps, "max_seconds": max_seconds, "max_epochs": max_epochs},
        "steps": int(trainer.state.iteration),
        "epochs": int(trainer.state.epoch),
        "train_seconds": float(state["train_seconds"]),
        "step_seconds_median": float(np.median(step_times)) if step_times else math.nan,
        "loss_first": float(np.mean(head)) if head else math.nan,
        "loss_last": float(np.mean(tail)) if tail else math.nan,
        "loss_curve": curve,
        "checkpoints": checkpoints,
        "stopped_by": state["stopped_by"],
    }


def cached_run(path: str, run: Callable[[], dict[str, Any]], say: Callable[[str], None] | None = print) -> dict:
    """The result stored at ``path`` (JSON) if a previous run finished, else ``run()``, stored atomically first.

    This is what makes a benchmark resumable: a killed benchmark, started again with the same work folder, reads
    back every finished run and trains only the missing ones.
    """
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        if say is not None:
            say(f"reusing finished run {path}")
        return result
    result = run()
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=lambda v: None)
    return result
