"""Killing training and rerunning it with ``--resume true`` continues from the last complete epoch, in every bundle.

HLWA-UNet is killed for real, as a user's ``python -m monai.bundle run training`` subprocess: with SIGKILL in the
middle of an epoch, with SIGTERM in the middle of an epoch, and with SIGKILL while a checkpoint is being written
(the process is held inside the save by the test seam ``TEST_SEAM_PAUSE_ENV`` of ``common.engines.checkpoint``). Each rerun
of the same command with ``--resume true`` must start at the epoch after the last saved one, from the saved weights
and optimiser state. The other bundles train one epoch and resume to a second one in-process (cheaper than a
subprocess), which exercises each bundle's own resumable state: EMA (MedSegDiff), both GAN networks, optimisers and
noise generator (COVID-19 GAN), the plateau scheduler of the TransUNet, the poly schedule of DC2Fusion.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from common.bundle.pipeline import load_pipeline, prepare_data, stage_command, stage_overrides
from common.engines.checkpoint import TEST_SEAM_PAUSE_ENV, load_checkpoint, save_checkpoint
from common.io import partial_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HLWA = os.path.join(REPO, "bundles", "brats_mri_hlwa_segmentation")
SAVED = re.compile(r"saved checkpoint epoch (\d+) ")
ITERS_PER_EPOCH = 3  # 3 training cases of the test profile, batch size 1


def _stage(bundle: str, name: str) -> dict:
    return next(s for s in load_pipeline(bundle)["stages"] if s["name"] == name)


def _overrides(bundle: str, stage: str, data: tuple[str, str], work: str, **extra) -> dict:
    out = {
        "dataset_dir": data[0],
        "data_list_file_path": data[1],
        "output_dir": os.path.join(work, stage),
        "ckpt_dir": os.path.join(work, "checkpoints"),
        "device": "cpu",
    }
    out.update(stage_overrides(_stage(bundle, stage), "test"))
    out.update(extra)
    return out


def _epoch(path: str) -> int:
    trainer = load_checkpoint(path)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


class _Run:
    """One ``python -m monai.bundle run training ...`` subprocess with its output in a log file."""

    def __init__(self, overrides: dict, log: str, env: dict | None = None) -> None:
        self.log = log
        cmd = stage_command(_stage(HLWA, "train"), overrides)
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                cmd,
                cwd=HLWA,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})),
            )

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"{pattern!r} not in the log of {self.proc.args}:\n{self.text()[-3000:]}")

    def stop(self, sig: int) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def hlwa_data(tmp_path_factory):
    return prepare_data(HLWA, str(tmp_path_factory.mktemp("brats")), "test")


@pytest.mark.slow
def test_hlwa_training_killed_mid_epoch_and_mid_save_resumes_from_the_last_good_checkpoint(hlwa_data, tmp_path):
    work = str(tmp_path)
    ov = _overrides(HLWA, "train", hlwa_data, work, epochs=3, batch_size=1)
    last = os.path.join(work, "checkpoints", "last.ckpt")

    # 1. SIGKILL in the middle of epoch 2: epoch 1 is safe in last.ckpt
    run = _Run(ov, os.path.join(work, "a.log"))
    run.wait_for(r"Epoch: 2/3, Iter: 1/3 ")
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    assert SAVED.findall(run.text())[-1] == "1" and _epoch(last) == 1
    # a probe: shift the saved weights, so that starting from them (not from a fresh initialisation) is visible
    state = load_checkpoint(last)
    shifted = {k: v + 0.05 if v.is_floating_point() else v for k, v in state["network"].items()}
    save_checkpoint({**state, "network": shifted}, last)

    # 2. the same command with --resume true; SIGTERM in the middle of epoch 3
    run = _Run({**ov, "resume": "true"}, os.path.join(work, "b.log"))
    run.wait_for(r"Epoch: 3/3, Iter: 1/3 ")
    assert run.stop(signal.SIGTERM) == -signal.SIGTERM
    log = run.text()
    assert f"resumed from {last} at epoch 1" in log
    assert "Epoch: 1/3, Iter" not in log and "Epoch: 2/3, Iter: 1/3 " in log  # epoch 1 is not redone
    assert SAVED.findall(log)[-1] == "2" and _epoch(last) == 2
    state = load_checkpoint(last)
    drift = max((state["network"][k] - v).abs().max().item() for k, v in shifted.items() if v.is_floating_point())
    assert drift < 0.01  # 3 AdamW steps of lr 1e-4 away from the shifted weights (a fresh start is 0.05 away)
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {2 * ITERS_PER_EPOCH}

    # 3. resumed again, and SIGKILLed inside the save of epoch 3, after the temporary file is written
    run = _Run({**ov, "resume": "true"}, os.path.join(work, "c.log"), env={TEST_SEAM_PAUSE_ENV: "3"})
    tmp = run.wait_for(r"pausing before the rename of (\S+) ").group(1)
    assert os.path.isfile(tmp) and _epoch(tmp) == 3 and _epoch(last) == 2
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    assert f"resumed from {last} at epoch 2" in run.text()
    assert partial_files(last) == [tmp] and _epoch(last) == 2  # the last good checkpoint is untouched

    # 4. the rerun cleans the leftover, resumes at epoch 2 and finishes
    run = _Run({**ov, "resume": "true"}, os.path.join(work, "d.log"))
    assert run.proc.wait(timeout=300) == 0, run.text()[-3000:]
    log = run.text()
    assert f"removed {tmp}" in log and f"resumed from {last} at epoch 2" in log
    assert SAVED.findall(log) == ["3"] and partial_files(last) == []
    state = load_checkpoint(last)
    assert _epoch(last) == 3
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {3 * ITERS_PER_EPOCH}
    model = load_checkpoint(os.path.join(work, "checkpoints", "model.pt"))  # the best weights, a plain state_dict
    assert set(model) == set(state["network"])


# ---------------------------------------------------------------- the other bundles, in-process


@contextlib.contextmanager
def _chdir(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _workflow(bundle: str, config: str, overrides: dict, workflow_type: str | None = "train") -> ConfigWorkflow:
    with _chdir(bundle):
        wf = ConfigWorkflow(
            config_file=os.path.join("configs", config), workflow_type=workflow_type, logging_file=False, **overrides
        )
        wf.initialize()
    return wf


def _run(bundle: str, wf: ConfigWorkflow) -> None:
    with _chdir(bundle):
        wf.run()
        wf.finalize()


def _train_then_resume(bundle: str, stage: str, config: str, data, work: str, watch, filename: str = "last.ckpt"):
    """Train 1 epoch, then resume to 2: returns (``filename`` after epoch 1, what ``watch`` saw once it was loaded).

    ``watch`` runs at ``STARTED`` right after the checkpoint handler (attached earlier, with the trainer), before
    anything of epoch 2 runs (the TransUNet's contrastive phase already steps at ``EPOCH_STARTED``).
    """
    ov = _overrides(bundle, stage, data, work, epochs=1)
    _run(bundle, _workflow(bundle, config, ov))
    last = os.path.join(ov["ckpt_dir"], filename)
    saved = load_checkpoint(last)
    wf = _workflow(bundle, config, {**ov, "epochs": 2, "resume": "true"})
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen = {}
    trainer.add_event_handler(Events.STARTED, lambda e: seen.setdefault("state", watch(wf, e)))
    _run(bundle, wf)
    assert trainer.state.epoch == 2 and saved["trainer"]["iteration"] > 0
    assert trainer.state.iteration == 2 * saved["trainer"]["iteration"]  # one more epoch, not two
    assert _epoch(last) == 2
    return saved, seen["state"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _weights(wf: ConfigWorkflow, id_: str) -> dict:
    net = wf.parser.get_parsed_content(id_)
    return {k: v.detach().clone() for k, v in getattr(net, "module", net).state_dict().items()}


@pytest.mark.slow
def test_medsegdiff_resumes_network_ema_and_warmup(tmp_path):
    bundle = os.path.join(REPO, "bundles", "brats_mri_medsegdiff_segmentation")
    data = prepare_data(bundle, str(tmp_path / "data"), "test")

    def watch(wf, engine):
        ema = wf.parser.get_parsed_content("ema_handler")
        return {
            "epoch": engine.state.epoch,
            "network": _weights(wf, "network"),
            "ema": _weights(wf, "ema_network"),
            "warmup": ema.momentum_scheduler.event_index,
        }

    saved, seen = _train_then_resume(bundle, "train", "train.json", data, str(tmp_path), watch)
    assert seen["epoch"] == 1
    assert _same(seen["network"], saved["network"]) and _same(seen["ema"], saved["ema"]["ema_model"])
    assert seen["warmup"] == saved["ema"]["momentum_event_index"] == saved["trainer"]["iteration"]


@pytest.mark.slow
def test_covid_gan_and_transunet_resume_both_networks_optimisers_and_schedules(tmp_path):
    bundle = os.path.join(REPO, "bundles", "covid_ct_gan_transunet_segmentation")
    data = prepare_data(bundle, str(tmp_path / "data"), "test")
    work = str(tmp_path)

    def watch_gan(wf, engine):
        return {
            "epoch": engine.state.epoch,
            "generator": _weights(wf, "network"),
            "discriminator": _weights(wf, "discriminator"),
            "d_steps": wf.parser.get_parsed_content("d_optimizer").state_dict()["state"][0]["step"].item(),
            "noise": engine.noise_generator.get_state(),
        }

    saved, seen = _train_then_resume(bundle, "train_gan", "train_gan.json", data, work, watch_gan, "last_gan.ckpt")
    assert seen["epoch"] == 1 and saved["trainer"]["healthy_epoch"] >= 1
    assert _same(seen["generator"], saved["generator"]) and _same(seen["discriminator"], saved["discriminator"])
    assert seen["d_steps"] == saved["trainer"]["iteration"]
    assert torch.equal(seen["noise"], saved["trainer"]["noise_generator"])  # the noise continues, not replayed
    assert os.path.isfile(os.path.join(work, "checkpoints", "generator.pt"))

    _run(bundle, _workflow(bundle, "pseudo_masks.json", _overrides(bundle, "pseudo_masks", data, work), None))

    def watch_seg(wf, engine):
        return {
            "epoch": engine.state.epoch,
            "network": _weights(wf, "network"),
            "plateau": wf.parser.get_parsed_content("lr_scheduler").state_dict(),
        }

    saved, seen = _train_then_resume(bundle, "train", "train.json", data, work, watch_seg)
    assert seen["epoch"] == 1 and _same(seen["network"], saved["network"])
    assert seen["plateau"]["last_epoch"] == saved["lr_scheduler"]["last_epoch"] == 1
    assert seen["plateau"]["best"] == saved["lr_scheduler"]["best"]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["bundles/adni_mri_pet_dc2fusion", "tests/example_bundle"])
def test_single_network_bundles_resume_weights_optimiser_and_schedule(bundle, tmp_path):
    bundle = os.path.join(REPO, bundle)
    data = prepare_data(bundle, str(tmp_path / "data"), "test")

    def watch(wf, engine):
        return {
            "epoch": engine.state.epoch,
            "network": _weights(wf, "network"),
            "lr": wf.parser.get_parsed_content("optimizer").param_groups[0]["lr"],
        }

    saved, seen = _train_then_resume(bundle, "train", "train.json", data, str(tmp_path), watch)
    assert seen["epoch"] == 1 and _same(seen["network"], saved["network"])
    assert seen["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
    if "lr_scheduler" in saved:  # DC2Fusion's poly decay has stepped once
        assert (
            saved["lr_scheduler"]["last_epoch"] == 1
            and seen["lr"] < saved["optimizer"]["param_groups"][0]["initial_lr"]
        )
