"""However training ends, it leaves a model for inference; killed and rerun with ``--resume true``, it continues from
the last complete epoch, in every bundle, in one process and under torchrun.

Every training config of every bundle, run for fewer epochs than its ``val_interval`` (``--epochs 1``, no
validation), leaves ``<ckpt_dir>/model.pt`` (the GAN: ``generator.pt``) that the inference network loads, saying in
its log that it holds the final weights; so does HLWA-UNet killed with SIGTERM in its first epoch, and its inference
then runs on that file. MONAI Label's way of running a training config (``train#handlers`` replaced by its checkpoint
loader followed by the config's own handlers) still writes ``model.pt``.

HLWA-UNet is killed for real, as a user's ``python -m monai.bundle run training`` subprocess: with SIGKILL in the
middle of an epoch, with SIGTERM in the middle of an epoch, and with SIGKILL while a checkpoint is being written
(the process is held inside the save by the test seam ``TEST_SEAM_PAUSE_ENV`` of ``common.engines.checkpoint``). Each rerun
of the same command with ``--resume true`` must start at the epoch after the last saved one, from the saved weights
and optimiser state. The other bundles train one epoch and resume to a second one in-process (cheaper than a
subprocess), which exercises each bundle's own resumable state: EMA (MedSegDiff), both GAN networks, optimisers and
noise generator (COVID-19 GAN), the plateau scheduler of the TransUNet, the poly schedule of DC2Fusion. Under
torchrun (2 processes, gloo), the whole job is SIGKILLed mid-epoch and rerun with ``--resume true``: both ranks resume
from the same checkpoint at the next epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from common.bundle.pipeline import load_pipeline, prepare_data, run_stage, stage_command, stage_overrides
from common.data.datalist import build_datalist, save_datalist
from common.data.synthetic.write import write_synthetic_dataset
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
    """One ``python -m monai.bundle run training ...`` subprocess (or ``cmd``) with its output in a log file."""

    def __init__(self, overrides: dict, log: str, env: dict | None = None, cmd: list[str] | None = None) -> None:
        self.log = log
        cmd = cmd or stage_command(_stage(HLWA, "train"), overrides)
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
        self.stop(signal.SIGKILL, tree=True)
        raise AssertionError(f"{pattern!r} not in the log of {self.proc.args}:\n{self.text()[-3000:]}")

    def finish(self, timeout: float) -> int:
        """Wait for the process to end by itself; kill it and its descendants after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL, tree=True)
            raise AssertionError(f"{self.proc.args} did not finish in {timeout} s:\n{self.text()[-3000:]}") from None

    def stop(self, sig: int, tree: bool = False) -> int:
        """Send ``sig`` to the process, or with ``tree`` to it and all its descendants at once (a whole torchrun
        job, whose workers run in sessions of their own); its exit status."""
        for pid in (_descendants(self.proc.pid) if tree else []) + [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return self.proc.wait(timeout=60)


def _descendants(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (Linux ``/proc``), children first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *_descendants(child)]
    return found


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
    assert run.finish(timeout=300) == 0, run.text()[-3000:]
    log = run.text()
    assert f"removed {tmp}" in log and f"resumed from {last} at epoch 2" in log
    assert SAVED.findall(log) == ["3"] and partial_files(last) == []
    state = load_checkpoint(last)
    assert _epoch(last) == 3
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {3 * ITERS_PER_EPOCH}
    model = load_checkpoint(os.path.join(work, "checkpoints", "model.pt"))  # the best weights, a plain state_dict
    assert set(model) == set(state["network"])


FINAL = re.compile(
    r"training stopped by SIGTERM, before any validation result: saved the final weights \(epoch 1, iteration (\d)\) to (\S+)"
)


@pytest.mark.slow
def test_hlwa_sigterm_in_the_first_epoch_leaves_a_model_that_inference_runs_on(hlwa_data, tmp_path):
    work = str(tmp_path)
    ov = _overrides(HLWA, "train", hlwa_data, work, epochs=3, val_interval=5, batch_size=1)
    run = _Run(ov, os.path.join(work, "train.log"))
    run.wait_for(r"Epoch: 1/3, Iter: 1/3 ")
    assert run.stop(signal.SIGTERM) == -signal.SIGTERM
    found = FINAL.search(run.text())
    model = os.path.join(work, "checkpoints", "model.pt")
    assert found and found.group(2) == model, run.text()[-3000:]
    assert not os.path.exists(os.path.join(work, "checkpoints", "last.ckpt"))  # no epoch completed
    infer = _overrides(HLWA, "inference", hlwa_data, work, ckpt_path=model)
    run_stage(HLWA, _stage(HLWA, "inference"), infer, os.path.join(work, "inference.log"))
    with open(hlwa_data[1]) as f:
        testing = json.load(f)["testing"]
    assert sorted(os.listdir(infer["output_dir"])) == sorted(f"{it['case']}_seg.nii.gz" for it in testing)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_job_killed_mid_epoch_resumes_on_both_ranks(tmp_path):
    """2 processes (gloo): SIGKILL to the whole job in epoch 2, then the same command with --resume true."""
    data = str(tmp_path / "brats")
    write_synthetic_dataset("brats2021", data, num_cases=6, shape=(32, 32, 32), seed=3, progress=False)
    datalist = str(tmp_path / "datalist.json")
    save_datalist(
        build_datalist("brats2021", data, seed=0, val_fraction=0.34, test_fraction=0.2, progress=False), datalist
    )
    work = str(tmp_path / "work")
    os.makedirs(work)
    ov = _overrides(HLWA, "train", (data, datalist), work, epochs=3, batch_size=1)
    last = os.path.join(work, "checkpoints", "last.ckpt")

    def torchrun(extra: dict) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "-m", "monai.bundle", "run", "training",
               "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]  # fmt: skip
        for k, v in {**ov, **extra}.items():
            cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]
        return cmd

    run = _Run({}, os.path.join(work, "a.log"), cmd=torchrun({}))
    iters = int(run.wait_for(r"Epoch: 2/3, Iter: 1/(\d+) ").group(1))
    assert run.stop(signal.SIGKILL, tree=True) == -signal.SIGKILL
    time.sleep(1)  # nothing is left running to write
    assert SAVED.findall(run.text())[-1] == "1" and _epoch(last) == 1

    run = _Run({}, os.path.join(work, "b.log"), cmd=torchrun({"resume": "true"}))
    assert run.finish(timeout=600) == 0, run.text()[-4000:]
    log = run.text()
    assert log.count(f"resumed from {last} at epoch 1") == 2  # rank 0 and rank 1, from the one file
    assert "Epoch: 1/3, Iter" not in log and "Epoch: 2/3, Iter: 1/" in log
    assert SAVED.findall(log) == ["2", "3"]  # rank 0 saves
    state = load_checkpoint(last)
    assert _epoch(last) == 3 and state["trainer"]["epoch_length"] == iters
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {3 * iters}
    assert set(load_checkpoint(os.path.join(work, "checkpoints", "model.pt"))) == set(state["network"])


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


# ---------------------------------------------------------------- every training config, ended before a validation

NO_VALIDATION = "before any validation result: saved the final weights (epoch 1, iteration"
SHORT = {"brats_mri_hlwa_segmentation": "hlwa", "brats_mri_medsegdiff_segmentation": "medsegdiff",
         "adni_mri_pet_dc2fusion": "dc2fusion"}  # fmt: skip
TRAIN_CONFIGS = [
    pytest.param(bundle, files, id=f"{SHORT[bundle]}-{'+'.join(f.removesuffix('.json') for f in files)}")
    for bundle in SHORT
    for files in (["train.json"], ["train.json", "multi_gpu_train.json"])
]


@pytest.fixture
def one_process_group(monkeypatch):
    """The environment torchrun gives its workers, for a job of one process: ``multi_gpu_train.json`` runs in-process
    (its ``initialize`` makes the gloo group, its ``finalize`` ends it)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


def _inference_network(bundle: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.update({k: v for k, v in stage_overrides(_stage(bundle, "inference"), "test").items() if "network" in k})
    return parser.get_parsed_content("network_def")


def _train_one_epoch_without_validation(bundle, stage, files, data, work, caplog) -> str:
    """Run ``files`` for 1 epoch with ``val_interval`` 2 in-process; the log of the run."""
    ov = _overrides(bundle, stage, data, work, epochs=1, val_interval=2)
    with _chdir(bundle):
        wf = ConfigWorkflow(config_file=[os.path.join("configs", f) for f in files], workflow_type="train",
                            logging_file=False, **ov)  # fmt: skip
        wf.initialize()
    caplog.clear()
    with caplog.at_level("INFO"):
        _run(bundle, wf)
    return caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("bundle, files", TRAIN_CONFIGS)
def test_every_training_config_ended_before_any_validation_leaves_a_model_for_inference(
    bundle, files, tmp_path, caplog, one_process_group
):
    bundle = os.path.join(REPO, "bundles", bundle)
    data = prepare_data(bundle, str(tmp_path / "data"), "test")
    log = _train_one_epoch_without_validation(bundle, "train", files, data, str(tmp_path), caplog)
    model = os.path.join(str(tmp_path), "checkpoints", "model.pt")
    assert f"training completed, {NO_VALIDATION} " in log and f") to {model}" in log, log[-3000:]
    _inference_network(bundle).load_state_dict(load_checkpoint(model))  # strict: every weight, no other


@pytest.mark.slow
def test_covid_gan_and_transunet_configs_ended_before_any_validation_leave_their_models(
    tmp_path, caplog, one_process_group
):
    bundle = os.path.join(REPO, "bundles", "covid_ct_gan_transunet_segmentation")
    data = prepare_data(bundle, str(tmp_path / "data"), "test")
    work = str(tmp_path)
    log = _train_one_epoch_without_validation(bundle, "train_gan", ["train_gan.json"], data, work, caplog)
    generator = os.path.join(work, "checkpoints", "generator.pt")
    assert "training completed: saved the final weights (epoch 1, iteration" in log and generator in log
    _run(bundle, _workflow(bundle, "pseudo_masks.json", _overrides(bundle, "pseudo_masks", data, work), None))
    for files in (["train.json"], ["train.json", "multi_gpu_train.json"]):
        with contextlib.suppress(FileNotFoundError):  # each config trains from scratch
            os.remove(os.path.join(work, "checkpoints", "last.ckpt"))
        log = _train_one_epoch_without_validation(bundle, "train", files, data, work, caplog)
        assert f"training completed, {NO_VALIDATION} " in log, log[-3000:]
        _inference_network(bundle).load_state_dict(load_checkpoint(os.path.join(work, "checkpoints", "model.pt")))


@pytest.mark.slow
def test_training_as_monai_label_runs_it_still_writes_model_pt(hlwa_data, tmp_path):
    """MONAI Label 0.8.5 runs ``configs/train.json`` with ``train#handlers`` replaced by its ``CheckpointLoader``
    (loading the current ``models/model.pt``) followed by the config's own handlers, and the annotated studies as
    the training and validation data (``monailabel/tasks/train/bundle.py``)."""
    work = str(tmp_path)
    ckpt_dir = os.path.join(work, "checkpoints")
    os.makedirs(ckpt_dir)
    model = os.path.join(ckpt_dir, "model.pt")
    torch.save(_inference_network(HLWA).state_dict(), model)
    before = load_checkpoint(model)
    parser = ConfigParser()
    parser.read_config(os.path.join(HLWA, "configs", "train.json"))
    loader = {"_target_": "CheckpointLoader", "load_path": model, "load_dict": {"model": "@network"}, "strict": False}
    items = build_datalist("brats2021", hlwa_data[0], seed=0, progress=False)
    studies = [{"image": [os.path.join(hlwa_data[0], f) for f in it["image"]],
                "label": os.path.join(hlwa_data[0], it["label"])} for it in items["training"]]  # fmt: skip
    ov = {k: v for k, v in _overrides(HLWA, "train", hlwa_data, work).items() if k != "epochs"}
    ov.update({
        "bundle_root": HLWA, "device": "cpu", "train#trainer#max_epochs": 1, "train#dataset#data": studies[:2],
        "validate#dataset#data": studies[2:], "train#handlers": [loader] + parser.get("train#handlers"),
        "data_list_file_path": os.path.join(work, "no_datalist.json"),  # MONAI Label has none
    })  # fmt: skip
    _run(HLWA, _workflow(HLWA, "train.json", ov))
    after = load_checkpoint(model)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
