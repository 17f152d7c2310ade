"""Kill-safe checkpoints: atomic saves, weights-only loads with clear refusals, and resuming a trainer."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from torch.utils.data import DataLoader

import common.engines.checkpoint as ckpt_module
from common.engines.checkpoint import (
    TEST_SEAM_PAUSE_ENV,
    BestModelSaver,
    FinalModelSaver,
    ResumableCheckpoint,
    SafeCheckpointLoader,
    load_checkpoint,
    save_checkpoint,
)
from common.errors import DataError
from common.io import partial_files


class PickledThing:
    """A class: a checkpoint holding an instance needs unpickling arbitrary code."""

    def __init__(self) -> None:
        self.value = 3


class Unserialisable:
    """Makes ``torch.save`` fail after it has started writing."""

    def __reduce__(self):
        raise RuntimeError("serialisation failed midway")


def _data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    items = [{"image": torch.randn(3, generator=gen), "label": torch.randn(1, generator=gen)} for _ in range(6)]
    return DataLoader(items, batch_size=2, shuffle=False)


def _trainer(tmp_path, max_epochs: int, resume, seed: int, extra_handlers=()):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    best = BestModelSaver(str(tmp_path), net)
    handler = ResumableCheckpoint(
        str(tmp_path), {"network": net, "optimizer": opt, "lr_scheduler": sched, "best_model": best}, resume=resume
    )
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=_data(),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
        # the learning-rate step comes first, so that the checkpoint of an epoch holds the stepped scheduler
        train_handlers=[LrScheduleHandler(sched, print_lr=False), handler, *extra_handlers],
    )
    return trainer, net, opt, sched, best


def test_save_leaves_the_previous_checkpoint_intact_when_serialisation_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="midway"):
        save_checkpoint({"w": torch.zeros(3), "bad": Unserialisable()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left either


def test_test_seam_pauses_inside_the_save_with_a_complete_temporary_file(tmp_path, monkeypatch):
    trainer, *_ = _trainer(tmp_path, max_epochs=2, resume=False, seed=0)
    seen = []

    def fake_sleep(seconds):
        tmp = partial_files(tmp_path / "last.ckpt")
        assert len(tmp) == 1
        inside = load_checkpoint(tmp[0])["trainer"]  # the temporary file is complete: epoch 2
        before = load_checkpoint(tmp_path / "last.ckpt")["trainer"]  # the final name still holds epoch 1
        seen.append((seconds, inside["iteration"], before["iteration"]))

    monkeypatch.setenv(TEST_SEAM_PAUSE_ENV, "2")
    monkeypatch.setattr(ckpt_module.time, "sleep", fake_sleep)
    trainer.run()
    assert seen == [(ckpt_module.TEST_SEAM_PAUSE_SECONDS, 6, 3)]
    assert load_checkpoint(tmp_path / "last.ckpt")["trainer"]["iteration"] == 6


@pytest.mark.parametrize(
    "content, detail",
    [({"w": torch.ones(2), "obj": PickledThing()}, "PickledThing"), ({"arr": __import__("numpy").zeros(3)}, "numpy")],
)
def test_a_checkpoint_with_pickled_objects_is_refused_with_a_clear_message(tmp_path, content, detail):
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(DataError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused: the checkpoint holds pickled Python objects (")
    assert detail in message and message.endswith("only tensors and plain containers are loaded (weights_only=True)")
    assert "\n" not in message


def test_missing_empty_and_truncated_checkpoints_are_data_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    save_checkpoint({"w": torch.ones(100)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_checkpoint(tmp_path / "cut.pt")
    assert str(err.value).startswith(
        f"{tmp_path / 'cut.pt'}: not a readable PyTorch checkpoint (truncated or corrupt?)"
    )


def test_resume_restores_epoch_weights_optimizer_scheduler_and_best_metric(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first, net, opt, sched, best = _trainer(tmp_path, max_epochs=2, resume=False, seed=0)
    best.best_metric, best.best_metric_epoch = 0.75, 2  # as if validation had run
    first.run()
    saved = load_checkpoint(tmp_path / "last.ckpt")
    assert set(saved) == {"trainer", "network", "optimizer", "lr_scheduler", "best_model"}
    assert saved["trainer"]["iteration"] == 6 and saved["trainer"]["epoch_length"] == 3
    assert "saved checkpoint epoch 2" in caplog.text

    seen = {}

    def at_epoch_start(engine):  # the state the resumed epoch starts from
        seen.setdefault("epoch", engine.state.epoch)
        seen.setdefault("weight", engine.network.weight.detach().clone())
        seen.setdefault("lr", engine.optimizer.param_groups[0]["lr"])

    second, net2, opt2, sched2, best2 = _trainer(tmp_path, max_epochs=3, resume="true", seed=123)
    assert not torch.equal(net2.weight, net.weight)  # another initialisation, to be overwritten
    second.add_event_handler(Events.EPOCH_STARTED, at_epoch_start)
    second.run()
    assert seen["epoch"] == 3  # continues at the next epoch, epochs 1-2 are not redone
    assert torch.equal(seen["weight"], saved["network"]["weight"])
    assert seen["lr"] == pytest.approx(0.01 * 0.5**2)  # the scheduler stepped twice before the kill
    assert second.state.epoch == 3 and second.state.max_epochs == 3 and second.state.iteration == 9
    assert opt2.state_dict()["state"][0]["step"].item() == 9  # Adam's step count continues
    assert sched2.last_epoch == 3
    assert (best2.best_metric, best2.best_metric_epoch) == (0.75, 2)
    assert f"resumed from {tmp_path / 'last.ckpt'} at epoch 2" in caplog.text


def test_resume_without_a_checkpoint_warns_and_starts_fresh(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer, *_ = _trainer(tmp_path, max_epochs=1, resume=True, seed=0)
    starts = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: starts.append(e.state.epoch))
    trainer.run()
    assert starts == [1]
    assert any(r.levelno == logging.WARNING and "does not exist" in r.getMessage() for r in caplog.records)


def test_resume_refuses_a_checkpoint_beyond_max_epochs_and_a_weights_only_file(tmp_path):
    _trainer(tmp_path, max_epochs=2, resume=False, seed=0)[0].run()
    with pytest.raises(DataError, match="beyond this run's 1 epochs: pass --epochs 2"):
        _trainer(tmp_path, max_epochs=1, resume=True, seed=0)[0].run()
    save_checkpoint(torch.nn.Linear(3, 1).state_dict(), tmp_path / "last.ckpt")
    with pytest.raises(DataError, match="not a resumable checkpoint"):
        _trainer(tmp_path, max_epochs=2, resume=True, seed=0)[0].run()


def test_stale_temporary_files_of_a_killed_save_are_removed_at_start(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    stale = tmp_path / ".last.ckpt.k1ll3d.partial-last.ckpt"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".model.pt.x.partial-model.pt"  # another output's temporary file is not this handler's
    other.write_bytes(b"x")
    trainer, *_ = _trainer(tmp_path, max_epochs=1, resume=False, seed=0)
    trainer.run()
    assert not stale.exists() and other.exists()
    assert f"removed {stale}" in caplog.text


def test_ema_handler_and_random_generator_states_round_trip(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        net = torch.nn.Linear(3, 1)
        ema = EMAHandler(net, momentum=0.01, momentum_warmup=0.5, warmup_iters=100)
        gen = torch.Generator().manual_seed(seed)

        def step(engine, batch):
            net.weight.data.add_(0.1)
            torch.rand(1, generator=gen)  # the run consumes random numbers, as the GAN's corruption noise does

        engine = Engine(step)
        ema.attach(engine)
        handler = ResumableCheckpoint(str(tmp_path), {"ema": ema, "noise": gen, "net": net, "skipped": None})
        handler.attach(engine)
        return engine, ema, gen

    engine, ema, gen = build(0)
    engine.run([0, 1, 2], max_epochs=1)
    handler_state = load_checkpoint(tmp_path / "last.ckpt")
    assert handler_state["ema"]["momentum_event_index"] == 3
    assert set(handler_state) == {"trainer", "ema", "noise", "net"}

    engine2, ema2, gen2 = build(1)
    ResumableCheckpoint(str(tmp_path), {"ema": ema2, "noise": gen2}, resume=True).restore(engine2)
    assert ema2.momentum_scheduler.event_index == 3
    for a, b in zip(ema.ema_model.parameters(), ema2.ema_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(4, generator=gen2), torch.rand(4, generator=gen))  # continues where it was


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"save_dict": {}}, "at least one object"),
        ({"save_dict": {"trainer": torch.nn.Linear(1, 1)}}, "reserved"),
        ({"save_dict": {"x": object()}}, "no state_dict"),
        ({"save_dict": {"n": torch.nn.Linear(1, 1)}, "resume": "maybe"}, "resume must be true or false"),
        ({"save_dict": {"n": torch.nn.Linear(1, 1)}, "filename": "sub/last.ckpt"}, "plain file name"),
    ],
)
def test_resumable_checkpoint_validates_its_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResumableCheckpoint(str(tmp_path), **kwargs)


def test_best_model_saver_keeps_the_best_as_a_plain_state_dict(tmp_path):
    net = torch.nn.Linear(3, 1)
    saver = BestModelSaver(str(tmp_path), net, key_metric_name="dice")
    engine = Engine(lambda e, b: None)
    for epoch, value, fill in [(1, 0.5, 1.0), (2, 0.4, 2.0), (3, float("nan"), 3.0), (4, 0.6, 4.0)]:
        torch.nn.init.constant_(net.weight, fill)
        engine.state.epoch, engine.state.metrics = epoch, {"dice": value}
        saver(engine)
        kept = load_checkpoint(tmp_path / "model.pt")
        assert set(kept) == {"weight", "bias"}
        assert kept["weight"].flatten()[0].item() == (1.0 if epoch < 4 else 4.0)
    assert saver.state_dict() == {"best_metric": 0.6, "best_metric_epoch": 4, "best_metric_name": "dice"}
    lower = BestModelSaver(str(tmp_path), net, filename="low.pt", key_metric_name="loss", greater_is_better=False)
    lower.load_state_dict({"best_metric": 0.2, "best_metric_epoch": 1})
    assert lower.is_better(0.1) and not lower.is_better(0.3)


def test_final_model_saver_writes_when_training_completes(tmp_path):
    net = torch.nn.Linear(3, 1)
    engine = Engine(lambda e, b: None)
    FinalModelSaver(str(tmp_path), net, filename="generator.pt").attach(engine)
    engine.run([0], max_epochs=2)
    assert torch.equal(load_checkpoint(tmp_path / "generator.pt")["weight"], net.weight)


def _validating_trainer(tmp_path, max_epochs: int, validate_at: dict[int, float]):
    """A trainer whose model file is kept by a FinalModelSaver and a BestModelSaver, with a fake validation giving
    ``validate_at[epoch]`` as the metric at the end of those epochs (attached after the saver, as in the configs)."""
    trainer, net, _, _, best = _trainer(tmp_path, max_epochs=max_epochs, resume=False, seed=0)
    FinalModelSaver(str(tmp_path), net, best_model_saver=best).attach(trainer)
    weights = {}

    def validate(engine):
        weights[engine.state.epoch] = net.weight.detach().clone()
        if engine.state.epoch in validate_at:
            evaluator = Engine(lambda e, b: None)
            evaluator.state.key_metric_name = "dice"
            evaluator.state.epoch, evaluator.state.metrics = (
                engine.state.epoch,
                {"dice": validate_at[engine.state.epoch]},
            )
            best(evaluator)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    return trainer, net, weights


def test_without_a_validation_the_final_weights_are_saved_with_a_line_saying_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer, net, weights = _validating_trainer(tmp_path, max_epochs=2, validate_at={})
    ends = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append(load_checkpoint(tmp_path / "model.pt")))
    trainer.run()
    # written at the end of every epoch (what a kill leaves), then at the end: the final weights
    assert [torch.equal(kept["weight"], weights[i + 1]) for i, kept in enumerate(ends)] == [True, True]
    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["weight"], net.weight)
    assert (
        f"training completed, before any validation result: saved the final weights (epoch 2, iteration 6) to "
        f"{tmp_path / 'model.pt'}" in caplog.text
    )


def test_after_a_validation_the_best_validated_weights_are_kept(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer, net, weights = _validating_trainer(tmp_path, max_epochs=3, validate_at={2: 0.5, 3: 0.25})
    trainer.run()
    kept = load_checkpoint(tmp_path / "model.pt")
    assert torch.equal(kept["weight"], weights[2]) and not torch.equal(kept["weight"], net.weight)
    assert f"training completed: {tmp_path / 'model.pt'} holds the best validated weights (epoch 2, dice 0.5000)" in (
        caplog.text
    )


def test_a_run_stopped_early_saves_the_weights_it_stopped_with(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer, net, _ = _validating_trainer(tmp_path, max_epochs=3, validate_at={})
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), lambda e: e.terminate())
    trainer.run()
    assert trainer.state.iteration == 5
    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["weight"], net.weight)
    assert "training stopped early, before any validation result: saved the final weights (epoch 2, iteration 5)" in (
        caplog.text
    )
    assert load_checkpoint(tmp_path / "last.ckpt")["trainer"]["iteration"] == 3  # the last completed epoch


_SIGTERM_SCRIPT = """
import logging, sys, time, torch
from monai.engines import SupervisedTrainer
from ignite.engine import Events
from common.engines.checkpoint import BestModelSaver, FinalModelSaver
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
torch.manual_seed(0)
net = torch.nn.Linear(3, 1)
best = BestModelSaver(sys.argv[1], net)
items = [{"image": torch.randn(3), "label": torch.randn(1)} for _ in range(50)]
trainer = SupervisedTrainer(
    device="cpu", max_epochs=2, train_data_loader=torch.utils.data.DataLoader(items, batch_size=1), network=net,
    optimizer=torch.optim.SGD(net.parameters(), lr=0.01), loss_function=torch.nn.MSELoss(),
    train_handlers=[FinalModelSaver(sys.argv[1], net, best_model_saver=best)],
)

@trainer.on(Events.ITERATION_COMPLETED)
def slowly(engine):
    torch.save(net.state_dict(), sys.argv[1] + "/at_iteration.pt")
    print("iteration", engine.state.iteration, flush=True)
    time.sleep(0.1)

trainer.run()
print("not reached", flush=True)
"""


def test_sigterm_stops_after_the_iteration_saves_the_weights_and_ends_the_process_by_sigterm(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 120
    while "iteration 3\n" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM, log.read_text()
    text = log.read_text()
    last = int([line for line in text.splitlines() if line.startswith("iteration ")][-1].split()[1])
    assert 3 <= last < 50 and "not reached" not in text  # stopped within epoch 1, after the iteration in progress
    assert "SIGTERM: training stops after the iteration (or validation) in progress" in text
    assert (
        f"training stopped by SIGTERM, before any validation result: saved the final weights (epoch 1, iteration "
        f"{last}) to {tmp_path / 'model.pt'}" in text
    )
    assert _same_weights(load_checkpoint(tmp_path / "model.pt"), load_checkpoint(tmp_path / "at_iteration.pt"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_final_model_saver_refuses_a_best_model_saver_of_another_file(tmp_path):
    net = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="they must keep one file"):
        FinalModelSaver(str(tmp_path), net, best_model_saver=BestModelSaver(str(tmp_path), net, filename="best.pt"))


def test_a_missing_model_file_names_the_training_command_that_writes_it(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 1
    command = "python -m monai.bundle run training --config_file configs/train.json"
    loader = SafeCheckpointLoader(str(tmp_path / "models" / "model.pt"), {"model": torch.nn.Linear(3, 1)})
    with pytest.raises(DataError) as err:
        SafeCheckpointLoader(
            str(tmp_path / "models" / "model.pt"), {"model": torch.nn.Linear(3, 1)}, training_command=command
        )(engine)
    assert str(err.value) == (
        f"{tmp_path / 'models' / 'model.pt'}: checkpoint file not found: it is written by `{command} --dataset_dir "
        f"<data> --data_list_file_path <datalist> --ckpt_dir {tmp_path / 'models'}` (run from the bundle folder); "
        "or pass --ckpt_path <a model file>"
    )
    with pytest.raises(DataError, match="the bundle's training writes it into its --ckpt_dir"):
        loader(engine)


def test_safe_checkpoint_loader_loads_weights_and_refuses_pickles_and_training_checkpoints(tmp_path):
    source, target = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    save_checkpoint(source.state_dict(), tmp_path / "model.pt")
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 1
    SafeCheckpointLoader(str(tmp_path / "model.pt"), {"model": target})(engine)
    assert torch.equal(target.weight, source.weight)
    torch.save({"weight": torch.ones(1, 3), "extra": PickledThing()}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="refused: the checkpoint holds pickled Python objects"):
        SafeCheckpointLoader(str(tmp_path / "bad.pt"), {"model": target})(engine)
    save_checkpoint({"trainer": {"iteration": 1}, "network": source.state_dict()}, tmp_path / "last.ckpt")
    with pytest.raises(DataError, match="load the network's weights from model.pt"):
        SafeCheckpointLoader(str(tmp_path / "last.ckpt"), {"model": target})(engine)
    save_checkpoint(torch.nn.Linear(4, 1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DataError, match="does not fit"):
        SafeCheckpointLoader(str(tmp_path / "other.pt"), {"model": target})(engine)
