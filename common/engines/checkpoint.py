"""Kill-safe checkpoints: resumable training state, best/final model weights, and loading that refuses pickles.

Training of every bundle can be killed at any moment (SIGTERM from a scheduler, SIGKILL from the OOM killer, a
power cut) and rerun with ``--resume true``: it continues from the end of the last completed epoch, so at most the
epoch in progress is lost, and a kill while a checkpoint is being written never damages the previous one.

Why not MONAI's ``CheckpointSaver`` (ignite's ``Checkpoint`` + ``DiskSaver``):

- with a fixed file name (``key_metric_filename="model.pt"``, ``final_filename``) or ``n_saved=1``, ignite's
  ``Checkpoint.__call__`` *removes* the previous file before it writes the new one, so a kill between the two
  leaves no checkpoint at all;
- MONAI's saver writes with ``DiskSaver(atomic=False)`` (straight into the final file: a kill mid-write leaves a
  truncated ``model.pt``), and ignite's atomic mode neither syncs the file to disk nor cleans the temporary files
  that a SIGKILL leaves behind;
- the trainer's position (epoch, iteration) and the key-metric tracking need to be saved with the weights, and
  restored with ``max_epochs`` taken from the current config, which MONAI's ``CheckpointLoader`` does but only for
  files written by the saver above.

Here every file is written through :func:`common.io.atomic_path` (temporary file in the same folder, ``fsync``,
``os.replace``): the final name always holds a complete checkpoint, old or new. Every load goes through
:func:`load_checkpoint`, i.e. ``torch.load(weights_only=True)``: a checkpoint holding pickled Python objects (which
could run arbitrary code when loaded) is refused with a :class:`~common.errors.DataError` naming the file.

Objects, all ignite handlers (``attach(engine)``) usable in bundle configs:

- :class:`ResumableCheckpoint` (trainer): ``last.ckpt`` with the state of the trainer and of every training object,
  saved at the end of each epoch, loaded at the start when ``resume`` is true;
- :class:`BestModelSaver` (evaluator): ``model.pt``, the plain ``state_dict`` of the network, when the key metric
  improves; its best value is part of the resumable state;
- :class:`FinalModelSaver` (trainer): keeps ``model.pt`` usable by inference however training ends (completed,
  stopped early, SIGTERM, killed): the best validated weights once a validation has given a metric, the latest weights
  until then, with a log line at the end saying which;
- :class:`SafeCheckpointLoader`: MONAI's ``CheckpointLoader`` loading through :func:`load_checkpoint`, saying which
  training command writes a checkpoint that is missing.

The test seam (:data:`TEST_SEAM_PAUSE_ENV`, at the end of this module) holds a save open so that a test can kill the
process inside it; it is inert unless that environment variable is set.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EMAHandler
from monai.handlers import CheckpointLoader
from monai.networks.utils import copy_model_state
from torch.nn.parallel import DataParallel, DistributedDataParallel

from common.engines.distributed import is_rank_zero
from common.errors import DataError
from common.io import atomic_path, remove_partial_files

__all__ = [
    "TEST_SEAM_PAUSE_ENV",
    "BestModelSaver",
    "FinalModelSaver",
    "ResumableCheckpoint",
    "SafeCheckpointLoader",
    "load_checkpoint",
    "save_checkpoint",
]

_TRAINER_KEY = "trainer"
_SCALER_KEY = "grad_scaler"
_REFUSED = (
    "refused: the checkpoint holds pickled Python objects ({detail}); "
    "only tensors and plain containers are loaded (weights_only=True)"
)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with errors that name the file and the problem.

    Args:
        path: a file written by ``torch.save``.
        map_location: as ``torch.load``; default ``"cpu"`` (the caller's ``load_state_dict`` moves tensors to the
            device of the network or optimiser they are loaded into).

    Raises:
        DataError: the file is missing or empty, truncated or not a PyTorch checkpoint, or holds pickled Python
            objects (classes, functions, numpy arrays): ``"<path>: refused: the checkpoint holds pickled Python
            objects (<first global>); only tensors and plain containers are loaded (weights_only=True)"``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "checkpoint file not found")
    if os.path.getsize(path) == 0:
        raise DataError(path, "the checkpoint file is empty (a write was interrupted?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise DataError(path, _REFUSED.format(detail=_refusal_detail(str(err)))) from err
        raise DataError(path, f"not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(err)}") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise DataError(path, f"not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _refusal_detail(message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return f"e.g. {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return found.group(1).strip() if found else "not a weights-only checkpoint"


def save_checkpoint(obj: Any, path: str | os.PathLike, before_replace: Callable[[str], None] | None = None) -> None:
    """``torch.save(obj)`` to a temporary file next to ``path``, ``fsync``, then ``os.replace`` onto ``path``.

    A failure or a kill at any point leaves ``path`` as it was (the previous checkpoint, or no file).

    Args:
        obj: tensors and plain containers (what :func:`load_checkpoint` accepts back).
        path: the final file.
        before_replace: called with the temporary file's path once it is complete, just before the rename
            (used by tests to stop a process at the worst moment).
    """
    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)
        if before_replace is not None:
            before_replace(tmp)


def _unwrap(obj: Any) -> Any:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``: checkpoints never carry ``module.``."""
    return obj.module if isinstance(obj, (DistributedDataParallel, DataParallel)) else obj


def _as_bool(value: bool | str | int, name: str) -> bool:
    """``True``/``False`` from a bool or from what a command line passes (``--resume true`` gives ``"true"``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ValueError(f"{name} must be true or false, got {value!r}")


class _GeneratorState:
    """``state_dict`` view of a ``torch.Generator`` (which has ``get_state``/``set_state`` instead)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["rng_state"])


class _EMAState:
    """``state_dict`` view of ignite's ``EMAHandler``: the averaged weights and the momentum warm-up position.

    The warm-up counter matters: restarted at 0 after a resume, a warm-up from ``momentum_warmup=1`` would copy the
    online weights into the EMA and discard its history.
    """

    def __init__(self, handler: EMAHandler) -> None:
        self.handler = handler

    def state_dict(self) -> dict[str, Any]:
        scheduler = getattr(self.handler, "momentum_scheduler", None)
        return {
            "ema_model": _unwrap(self.handler.ema_model).state_dict(),
            "momentum_event_index": None if scheduler is None else int(scheduler.event_index),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _unwrap(self.handler.ema_model).load_state_dict(state["ema_model"])
        scheduler = getattr(self.handler, "momentum_scheduler", None)
        if scheduler is not None and state.get("momentum_event_index") is not None:
            scheduler.event_index = int(state["momentum_event_index"])


def _stateful(key: str, obj: Any) -> Any:
    """An object with ``state_dict``/``load_state_dict`` standing for ``obj``; ``ValueError`` when there is none."""
    if isinstance(obj, torch.Generator):
        return _GeneratorState(obj)
    if isinstance(obj, EMAHandler):
        return _EMAState(obj)
    obj = _unwrap(obj)
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return obj
    raise ValueError(
        f"save_dict[{key!r}] is a {type(obj).__name__}, which has no state_dict/load_state_dict "
        "(networks, optimisers, lr schedulers, engines, EMAHandler, torch.Generator and the savers here have)"
    )


class ResumableCheckpoint:
    """Save the whole training state at the end of every epoch; restore it at the start when ``resume`` is true.

    The file (``<save_dir>/<filename>``, default ``last.ckpt``) is a dict: ``"trainer"`` (the engine's
    ``state_dict()``: epoch, iteration, epoch length), one entry per ``save_dict`` key with that object's
    ``state_dict()``, and ``"grad_scaler"`` when the trainer runs with AMP (``engine.scaler``, made by MONAI's
    trainer at run time and so not reachable from a config). Networks wrapped in ``DistributedDataParallel`` are
    saved and loaded without the ``module.`` prefix, so single- and multi-GPU checkpoints are interchangeable.

    Events (attach it to the trainer, after the ``ValidationHandler`` and any ``LrScheduleHandler`` so that the
    saved state includes this epoch's validation and learning-rate step):

    - ``STARTED``: removes temporary files that a kill during a save left next to the file (rank 0); then, when
      ``resume`` is true and the file exists, loads everything with ``weights_only=True``, restores the trainer's
      epoch and iteration but keeps ``max_epochs`` from the config (so ``--epochs`` can extend a finished run), and
      logs ``"resumed from <file> at epoch N"``; training continues at epoch N + 1. With ``resume`` true and no
      file it logs a warning and starts from scratch.
    - ``EPOCH_COMPLETED``: on rank 0 only, writes the file atomically (temporary file, ``fsync``, rename) and logs
      ``"saved checkpoint epoch N"``. Every rank loads on resume, as every rank must start from the same weights.

    What is not restored: the random streams of data shuffling and augmentation (MONAI transforms keep their own
    generators), so a resumed run is equivalent to, not bit-identical with, an uninterrupted one.

    Args:
        save_dir: folder of the checkpoint (the bundle's ``ckpt_dir``).
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (network, optimiser, lr scheduler,
            :class:`BestModelSaver`, ...), or an ignite ``EMAHandler`` (its EMA weights and warm-up position), or a
            ``torch.Generator``. ``None`` values are skipped, so a config can list optional objects. The names
            ``"trainer"`` and ``"grad_scaler"`` are reserved.
        filename: file name inside ``save_dir``. Default ``"last.ckpt"``.
        resume: load the file at the start. A bool, or a command-line string (``"true"``/``"false"``). Default
            False: the run starts from scratch and overwrites the file at the end of its first epoch.
        map_location: ``map_location`` of the load. Default ``"cpu"`` (``load_state_dict`` moves each tensor to the
            device of the object it is loaded into).
        name: logger name; default the engine's logger.

    Raises:
        ValueError: empty ``save_dict``, a reserved name, an object without state, a ``filename`` with a folder,
            or a ``resume`` that is not a boolean.

    Test seam: see :data:`TEST_SEAM_PAUSE_ENV`.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "last.ckpt",
        resume: bool | str = False,
        map_location: Any = "cpu",
        name: str | None = None,
    ) -> None:
        if not save_dir:
            raise ValueError("save_dir must name a folder")
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(f"filename must be a plain file name without a folder, got {filename!r}")
        if not isinstance(save_dict, Mapping):
            raise ValueError(f"save_dict must be a mapping of names to objects, got {type(save_dict).__name__}")
        reserved = sorted({_TRAINER_KEY, _SCALER_KEY} & set(save_dict))
        if reserved:
            raise ValueError(f"save_dict must not use the reserved names {reserved}: they hold the trainer's state")
        self.objects = {key: _stateful(key, obj) for key, obj in save_dict.items() if obj is not None}
        if not self.objects:
            raise ValueError("save_dict must hold at least one object to save (the network, its optimiser, ...)")
        self.path = os.path.join(os.fspath(save_dir), filename)
        self.resume = _as_bool(resume, "resume")
        self.map_location = map_location
        self._name = name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def state_of(self, engine: Engine) -> dict[str, Any]:
        """What :meth:`save` writes: the trainer's and every object's ``state_dict``."""
        state: dict[str, Any] = {_TRAINER_KEY: engine.state_dict()}
        for key, obj in self.objects.items():
            state[key] = obj.state_dict()
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            state[_SCALER_KEY] = scaler.state_dict()
        return state

    def save(self, engine: Engine) -> None:
        """Write the checkpoint (rank 0 only), atomically."""
        if not is_rank_zero():
            return
        epoch = int(engine.state.epoch)
        save_checkpoint(self.state_of(engine), self.path, before_replace=_test_seam_pause(epoch, self.logger))
        self.logger.info(f"saved checkpoint epoch {epoch} to {self.path}")

    def restore(self, engine: Engine) -> None:
        """Remove stale temporary files; load the checkpoint when ``resume`` is true and it exists."""
        if is_rank_zero():
            for tmp in remove_partial_files(self.path):
                self.logger.info(f"removed {tmp}, left by a run killed while saving")
        if not self.resume:
            return
        if not os.path.isfile(self.path):
            self.logger.warning(f"resume requested but {self.path} does not exist: training starts from scratch")
            return
        checkpoint = load_checkpoint(self.path, self.map_location)
        if not isinstance(checkpoint, Mapping) or _TRAINER_KEY not in checkpoint:
            raise DataError(
                self.path,
                "not a resumable checkpoint (no trainer state): resume from the last.ckpt that training writes, "
                "not from model.pt, which holds only the network's weights",
            )
        missing = [key for key in self.objects if key not in checkpoint]
        if missing:
            raise DataError(
                self.path,
                f"has no state for {missing} (it holds {sorted(checkpoint)}): it was written by a different "
                "training configuration",
            )
        for key, obj in self.objects.items():
            try:
                obj.load_state_dict(checkpoint[key])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                raise DataError(self.path, f"cannot restore {key!r}: {err}") from err
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and _SCALER_KEY in checkpoint:
            scaler.load_state_dict(checkpoint[_SCALER_KEY])
        self._restore_engine(engine, checkpoint[_TRAINER_KEY])
        self.logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}")

    def _restore_engine(self, engine: Engine, state: Mapping[str, Any]) -> None:
        """Epoch and iteration from the checkpoint; ``max_epochs`` and the epoch length from the current run."""
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        engine.load_state_dict(state)
        epoch = int(engine.state.epoch)
        if max_epochs is not None and epoch > max_epochs:
            raise DataError(
                self.path,
                f"the checkpoint is at epoch {epoch}, beyond this run's {max_epochs} epochs: pass --epochs {epoch} "
                "or more to continue it, or --resume false to start again",
            )
        engine.state.max_epochs = max_epochs
        if epoch_length is not None and engine.state.epoch_length != epoch_length:
            self.logger.warning(
                f"{self.path}: {engine.state.epoch_length} iterations per epoch when saved, {epoch_length} now "
                "(the training data changed): epochs continue with the new length"
            )
            engine.state.epoch_length = epoch_length
            engine.state.iteration = epoch * epoch_length
        if epoch == max_epochs:
            self.logger.info(f"{self.path} is at the last epoch ({epoch}): nothing left to train")


class _NetworkFileSaver:
    """Shared part of :class:`BestModelSaver` and :class:`FinalModelSaver`: validated arguments, and an atomic
    write of the network's plain ``state_dict`` on the saving rank (after removing a killed write's leftovers)."""

    event = Events.EPOCH_COMPLETED

    def __init__(
        self, save_dir: str | os.PathLike, network: torch.nn.Module, filename: str = "model.pt", name: str | None = None
    ) -> None:
        if not save_dir:
            raise ValueError("save_dir must name a folder")
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(f"filename must be a plain file name without a folder, got {filename!r}")
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        self.path = os.path.join(os.fspath(save_dir), filename)
        self.network = network
        self._name = name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(self.event, self)

    def _save(self, message: str, level: int = logging.INFO) -> None:
        if is_rank_zero():
            remove_partial_files(self.path)
            save_checkpoint(_unwrap(self.network).state_dict(), self.path)
            self.logger.log(level, f"{message} to {self.path}")


class BestModelSaver(_NetworkFileSaver):
    """Save the network's plain ``state_dict`` to ``<save_dir>/<filename>`` whenever the key metric improves.

    Attach it to the evaluator (it runs at the evaluator's ``EPOCH_COMPLETED``, after the metrics). The file holds
    exactly ``network.state_dict()`` (without a DDP ``module.`` prefix), what inference and ``ckpt_export`` load.
    It is written atomically on rank 0 (see the module docstring for why not MONAI's ``CheckpointSaver``). The best
    value, its epoch and the metric's name are this object's ``state_dict``: list it in :class:`ResumableCheckpoint`'s
    ``save_dict`` so that a resumed run does not overwrite a better model with its first, worse one. Until a
    validation has run, the file is kept by a :class:`FinalModelSaver` given this saver as ``best_model_saver``.

    Args:
        save_dir: folder of the file.
        network: the network whose weights are saved (e.g. the EMA network of a diffusion model).
        filename: file name. Default ``"model.pt"``.
        key_metric_name: metric in ``engine.state.metrics``; default the evaluator's key metric.
        greater_is_better: higher metric values are better. Default True.
        name: logger name; default the engine's logger.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        filename: str = "model.pt",
        key_metric_name: str | None = None,
        greater_is_better: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(save_dir, network, filename, name)
        self.key_metric_name = key_metric_name
        self.greater_is_better = bool(greater_is_better)
        self.best_metric: float | None = None
        self.best_metric_epoch = -1
        self.best_metric_name: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric": self.best_metric,
            "best_metric_epoch": self.best_metric_epoch,
            "best_metric_name": self.best_metric_name,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state["best_metric"]
        self.best_metric = None if best is None else float(best)
        self.best_metric_epoch = int(state["best_metric_epoch"])
        self.best_metric_name = state.get("best_metric_name")  # absent from checkpoints of earlier versions

    def is_better(self, value: float) -> bool:
        """Strictly better than the best so far (NaN never is)."""
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.greater_is_better else value < self.best_metric

    def __call__(self, engine: Engine) -> None:
        name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise ValueError(
                f"BestModelSaver: no metric {name!r} in the evaluator's metrics {sorted(engine.state.metrics)}"
            )
        value = engine.state.metrics[name]
        if torch.is_tensor(value):
            if value.numel() != 1:
                self.logger.warning(f"BestModelSaver: {name} is not a scalar ({tuple(value.shape)}); not compared")
                return
            value = value.item()
        value = float(value)
        if not self.is_better(value):
            return
        self.best_metric, self.best_metric_epoch, self.best_metric_name = value, int(engine.state.epoch), name
        self._save(f"saved best model ({name}={value:.4f}, epoch {self.best_metric_epoch})")


class _StopOnSigterm:
    """One per engine: SIGTERM asks the engine to stop after its iteration in progress; once the run has completed
    (every ``COMPLETED`` handler done, the model files written), the process is ended by that SIGTERM after all.

    Why not let SIGTERM end the process at once (Python's default): nothing would write the weights of a run killed
    before any checkpoint; why not end the run with an exception: ignite hands it to ``EXCEPTION_RAISED`` handlers
    (MONAI's ``StatsHandler`` logs a traceback), and the weights would be those of an interrupted optimiser step.
    """

    _ATTRIBUTE = "_common_stop_on_sigterm"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.signalled = False
        self._previous: Any = None
        engine.add_event_handler(Events.STARTED, self._install)

    @classmethod
    def of(cls, engine: Engine) -> _StopOnSigterm:
        """The engine's stopper, made and attached on first use."""
        stop = getattr(engine, cls._ATTRIBUTE, None)
        if stop is None:
            stop = cls(engine)
            setattr(engine, cls._ATTRIBUTE, stop)
        return stop

    def _install(self, engine: Engine) -> None:
        if threading.current_thread() is not threading.main_thread():
            engine.logger.debug("not in the main thread: SIGTERM keeps its default action")
            return
        self.signalled = False
        if signal.getsignal(signal.SIGTERM) != self._on_sigterm:  # not yet installed (or left by a failed run)
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        # added at STARTED, after every handler attached at construction: runs last among COMPLETED handlers
        if not engine.has_event_handler(self._finish, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self._finish)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.signalled:  # a second SIGTERM: stop now
            self._restore()
            signal.raise_signal(signum)
            return
        self.signalled = True
        self.engine.logger.warning(
            "SIGTERM: training stops after the iteration (or validation) in progress, writes the model, then exits"
        )
        self.engine.terminate()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _finish(self, engine: Engine) -> None:
        self._restore()
        if self.signalled:
            signal.raise_signal(signal.SIGTERM)  # the previous action, by default: end the process (status -15)


class FinalModelSaver(_NetworkFileSaver):
    """Keep ``<save_dir>/<filename>`` usable by inference however training ends: the network's plain ``state_dict``.

    Without ``best_model_saver`` (a model used as trained to the end, e.g. the COVID-19 GAN's generator, which has no
    validation metric) the file holds the latest weights. With it (the :class:`BestModelSaver` of the same file), the
    file holds the best validated weights once a validation has given a metric, and the latest weights until then,
    so that a run shorter than its ``val_interval`` (``--epochs 1``) still leaves a model for inference.

    When it writes (atomically, on rank 0; nothing more once ``best_model_saver`` holds a best):

    - at the end of every epoch (attach it before the ``ValidationHandler``, so the file is written before a long
      validation starts): a kill at any moment, SIGKILL included, leaves the weights of the last completed epoch,
      the epoch that ``last.ckpt`` resumes from;
    - when the run ends (``COMPLETED``: all epochs done, or stopped early by ``engine.terminate()``), with one log line
      saying what the file holds: ``"training completed: <file> holds the best validated weights (epoch E,
      val_mean_dice 0.8123)"``, or ``"training completed, before any validation result: saved the final weights
      (epoch E, iteration I) to <file>"`` (``stopped early`` / ``stopped by SIGTERM`` in place of ``completed``);
    - on SIGTERM (a scheduler's stop, ``kill``, torchrun passing one on): the trainer stops after the iteration (or
      validation) in progress, the file is written as at the end of a run, and the process is then ended by that
      SIGTERM as it would have been (exit status 143, ``-15`` from ``subprocess``), without the config's
      ``finalize``. A second SIGTERM ends it at once. The handler is installed in the main thread only; under
      torchrun, a rank that is waiting for another's collective at that moment is ended by torchrun instead, and
      then the file holds the weights of the last completed epoch.

    A resumed run whose checkpoint is already at the last epoch completes at once and writes the file again.

    Args:
        save_dir: folder of the file.
        network: the network to save (for a diffusion model, the EMA network, as its best-model saver).
        filename: file name. Default ``"model.pt"``.
        best_model_saver: the evaluator's :class:`BestModelSaver` writing the same file, whose validated best is
            kept once there is one. Default None.
        name: logger name; default the engine's logger.

    Raises:
        ValueError: ``best_model_saver`` is not a :class:`BestModelSaver` or writes another file.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        filename: str = "model.pt",
        best_model_saver: BestModelSaver | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(save_dir, network, filename, name)
        if best_model_saver is not None:
            if not isinstance(best_model_saver, BestModelSaver):
                raise ValueError(f"best_model_saver must be a BestModelSaver, got {type(best_model_saver).__name__}")
            if os.path.abspath(best_model_saver.path) != os.path.abspath(self.path):
                raise ValueError(
                    f"best_model_saver writes {best_model_saver.path}, this saver {self.path}: they must keep one file"
                )
        self.best_model_saver = best_model_saver
        self._stop: _StopOnSigterm | None = None

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        self._stop = _StopOnSigterm.of(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_latest)
        engine.add_event_handler(Events.COMPLETED, self)

    def _validated(self) -> bool:
        return self.best_model_saver is not None and self.best_model_saver.best_metric is not None

    def save_latest(self, engine: Engine) -> None:
        """End of an epoch: write the weights unless a validated best is kept."""
        if not self._validated():
            self._save(f"saved the weights of epoch {engine.state.epoch} (no validation result yet)", logging.DEBUG)

    def __call__(self, engine: Engine) -> None:
        """End of the run: write the final weights unless a validated best is kept; say which the file holds."""
        if self._stop is not None and self._stop.signalled:
            how = "training stopped by SIGTERM"
        elif engine.should_terminate:
            how = "training stopped early"
        else:
            how = "training completed"
        best = self.best_model_saver
        if self._validated():
            if is_rank_zero():
                metric = best.best_metric_name or "key metric"
                self.logger.info(
                    f"{how}: {self.path} holds the best validated weights "
                    f"(epoch {best.best_metric_epoch}, {metric} {best.best_metric:.4f})"
                )
            return
        before = ", before any validation result" if best is not None else ""
        self._save(
            f"{how}{before}: saved the final weights (epoch {engine.state.epoch}, iteration {engine.state.iteration})"
        )


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose load goes through :func:`load_checkpoint`.

    MONAI's loader already passes ``weights_only=True``, but a refused or damaged file then ends in a long
    ``UnpicklingError`` / ``RuntimeError`` from the depths of ``torch.load``; this one raises a one-line
    :class:`~common.errors.DataError` naming the file (see :func:`load_checkpoint`), says which training command
    writes a file that is missing, and says so when a training checkpoint (``last.ckpt``) is given where the network's
    weights (``model.pt``) are expected. Arguments and behaviour are otherwise MONAI's (``load_path``, ``load_dict``,
    ``map_location``, ``strict``, ``strict_shape``), plus:

    Args:
        training_command: the command that writes ``load_path`` (run from the bundle folder, without its
            ``--ckpt_dir``), e.g. ``"python -m monai.bundle run training --config_file configs/train.json"``; a
            missing file is then reported as ``"<path>: checkpoint file not found: it is written by `<command>
            --dataset_dir <data> --data_list_file_path <datalist> --ckpt_dir <folder of path>`; or pass --ckpt_path
            <a model file>"``. Default None: the message says that the bundle's training writes it.
    """

    def __init__(self, *args: Any, training_command: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_command = training_command

    def _missing(self) -> DataError:
        folder = os.path.dirname(os.path.abspath(self.load_path))
        if self.training_command:
            how = (
                f"it is written by `{self.training_command} --dataset_dir <data> --data_list_file_path <datalist> "
                f"--ckpt_dir {folder}` (run from the bundle folder)"
            )
        else:
            how = "the bundle's training writes it into its --ckpt_dir"
        return DataError(self.load_path, f"checkpoint file not found: {how}; or pass --ckpt_path <a model file>")

    def __call__(self, engine: Engine) -> None:
        if not os.path.exists(self.load_path):
            raise self._missing()
        checkpoint = load_checkpoint(self.load_path, self.map_location)
        if not isinstance(checkpoint, Mapping):
            raise DataError(self.load_path, f"holds a {type(checkpoint).__name__}, not a state_dict")
        key = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and key not in checkpoint:
            if _TRAINER_KEY in checkpoint:
                raise DataError(
                    self.load_path,
                    "is a training checkpoint (last.ckpt, keys "
                    f"{sorted(checkpoint)}); load the network's weights from model.pt instead",
                )
            checkpoint = {key: checkpoint}  # a single object saved as its plain state_dict
        checkpoint = dict(checkpoint)
        load_dict = dict(self.load_dict)
        if not self.strict_shape:
            for k, obj in list(load_dict.items()):
                if isinstance(obj, torch.nn.Module):
                    checkpoint[k] = copy_model_state(obj, checkpoint[k], inplace=False)[0]
                else:
                    self.logger.warning(f"strict_shape is False: {k!r} is not a network and is not loaded")
                    load_dict.pop(k)
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint, strict=self.strict)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise DataError(self.load_path, f"does not fit {sorted(load_dict)}: {err}") from err
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise DataError(
                self.load_path,
                f"epoch {engine.state.epoch} in the checkpoint is beyond the engine's max_epochs {prior_max_epochs}",
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


# ------------------------------------------------------------------------------------------------------ test seam

#: Test seam, not a setting: when this environment variable holds an epoch number, :class:`ResumableCheckpoint`
#: logs ``"pausing before the rename of <tmp>"`` inside the save of that epoch, once the temporary file is complete
#: and before the rename, and sleeps :data:`TEST_SEAM_PAUSE_SECONDS`. ``tests/bundles/test_resume.py`` kills the
#: process there (a subprocess run by the command line a user types, hence an environment variable rather than an
#: argument) to show that a kill during a save leaves the previous checkpoint intact. Unset, it does nothing.
TEST_SEAM_PAUSE_ENV = "COMMON_TEST_SEAM_PAUSE_CHECKPOINT_AT_EPOCH"
TEST_SEAM_PAUSE_SECONDS = 60.0


def _test_seam_pause(epoch: int, logger: logging.Logger) -> Callable[[str], None] | None:
    """The ``before_replace`` of the save of ``epoch`` that :data:`TEST_SEAM_PAUSE_ENV` asks for, or None."""
    wanted = os.environ.get(TEST_SEAM_PAUSE_ENV, "").strip()
    if not wanted or int(wanted) != epoch:
        return None

    def pause(tmp: str) -> None:
        logger.info(f"pausing before the rename of {tmp} ({TEST_SEAM_PAUSE_ENV}={wanted})")
        time.sleep(TEST_SEAM_PAUSE_SECONDS)

    return pause
