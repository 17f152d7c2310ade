"""The packaged segmentation bundles served by MONAI Label's ``monaibundle`` app: inference and training over REST.

What a MONAI Label user does, end to end, on tiny synthetic data:

1. ``python3 tools/monailabel_env.py`` creates ``.venv-monailabel`` (MONAI Label 0.8.5 needs numpy < 2, so it has
   its own environment; about 4 minutes the first time, then reused);
2. each segmentation bundle is packaged (:func:`common.bundle.package.package_bundle`) and unpacked into the app's
   ``model/`` folder, with the tiny "test" profile of its ``pipeline.json`` written into its configs (MONAI Label
   passes no command-line overrides) and the weights of that tiny network as ``models/model.pt``;
3. studies: brain MRI as one 4-channel NIfTI per study (T1c, T1, T2, FLAIR), chest CT as the MosMed files; two
   of each annotated (``labels/final``);
4. two servers (``monailabel start_server --host 127.0.0.1``), one per study folder, as a user would run one per
   image collection: brain MRI with the HLWA-UNet and MedSegDiff bundles, chest CT with the COVID bundle;
5. ``POST /infer/<model>?image=<id>&output=image`` for each bundle: a label volume on the study's grid (shape and
   affine) with the dataset's label values; ``POST /train/<model>`` (1 epoch, run synchronously): a new
   ``models/model.pt`` holding the network's weights, which the next inference uses.

The servers run the packaged code only: their Python cannot import this repository's ``common`` (checked). In CI
(``CI`` set) the environment is always built and nothing is skipped; elsewhere the module is skipped, loudly, only
when the environment cannot be created.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.bundle.monailabel import (
    SEGMENTATION_BUNDLES,
    monaibundle_app_source,
    pin_overrides,
    write_app,
    write_studies,
)
from common.bundle.package import package_bundle, unpack_bundle
from common.bundle.pipeline import load_pipeline, prepare_data, stage_overrides
from common.data.decathlon import load_datalist

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_TOOL = os.path.join(REPO, "tools", "monailabel_env.py")
ENV_DIR = os.path.join(REPO, ".venv-monailabel")
ENV_PYTHON = os.path.join(ENV_DIR, "bin", "python")
HLWA, MEDSEGDIFF, COVID = SEGMENTATION_BUNDLES
BRAIN_MODELS = (HLWA, MEDSEGDIFF)
CT_MODELS = (COVID,)
# label values each bundle writes: BraTS 2021 convention (the default without a datalist), WT mask, lesion mask
LABEL_VALUES = {HLWA: {0, 1, 2, 4}, MEDSEGDIFF: {0, 1}, COVID: {0, 1}}
SERVER_START_S = 300
REQUEST_S = 300


def _environment() -> str:
    """Build (or reuse) the MONAI Label environment through the project's tool; its python."""
    proc = subprocess.run(
        [sys.executable, ENV_TOOL], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0 or not os.path.isfile(ENV_PYTHON):
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        message = f"tools/monailabel_env.py failed (exit {proc.returncode}):\n{tail}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(
            "MONAI LABEL INTEGRATION NOT TESTED: the MONAI Label environment (.venv-monailabel) could not be created "
            "here. " + message
        )
    return ENV_PYTHON


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_overrides(bundle: str) -> tuple[dict, dict]:
    """The "test" profile of the bundle's pipeline.json for its inference and train configs."""
    stages = {s["name"]: s for s in load_pipeline(os.path.join(REPO, "bundles", bundle))["stages"]}
    infer = stage_overrides(stages["inference"], "test")
    train = stage_overrides(stages["train"], "test")
    if bundle == COVID:  # trained on annotated studies, no pseudo-mask slice classes: the grid is the inference one
        train["default_roi_size"] = infer["roi_size"]
    return infer, train


def _tiny_network(bundle: str, overrides: dict) -> torch.nn.Module:
    """The bundle's ``network_def`` with the tiny profile, built from the repository's inference config."""
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundles", bundle, "configs", "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


class Server:
    """``monailabel start_server`` in a subprocess of the MONAI Label environment, on 127.0.0.1."""

    def __init__(self, python: str, app: str, studies: str, models: tuple[str, ...], work: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(work, f"server_{os.path.basename(studies)}.log")
        cmd = [python, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies]
        for conf in (f"models {','.join(models)}", "zoo_source github", "sam2 false", "preload false"):
            cmd += ["--conf", *conf.split(" ", 1)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        # no PYTHONPATH: the packaged bundles must run without this repository's `common`
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(MONAI_LABEL_SESSION_PATH=os.path.join(work, "sessions"), PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 60) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def wait(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        pytest.fail(f"MONAI Label server not up after {SERVER_START_S} s:\n{self.log_tail()}")

    def post(self, path: str, body: dict | None = None, form: dict | None = None) -> bytes:
        """POST ``body`` as JSON (training) or ``form`` as form fields (inference's ``params``)."""
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
        else:
            data = json.dumps(body).encode() if body is not None else b""
            headers = {"Content-Type": "application/json"} if body is not None else {}
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
                return r.read()
        except urllib.error.HTTPError as err:
            pytest.fail(f"POST {path} -> {err.code} {err.read()[:300]!r}\n--- server log ---\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Packaged bundles with tiny weights in a monaibundle app, brain and CT studies, and one server for each."""
    python = _environment()
    work = str(tmp_path_factory.mktemp("monailabel"))
    data_root = os.path.join(work, "data")
    brats = prepare_data(os.path.join(REPO, "bundles", HLWA), data_root, "test")
    mosmed = prepare_data(os.path.join(REPO, "bundles", COVID), data_root, "test")

    bundle_dirs = []
    for bundle in SEGMENTATION_BUNDLES:
        archive = package_bundle(bundle, os.path.join(work, "zips"))
        folder = unpack_bundle(archive, os.path.join(work, "unpacked"))
        infer, train = _tiny_overrides(bundle)
        pin_overrides(os.path.join(folder, "configs", "inference.json"), infer)
        pin_overrides(os.path.join(folder, "configs", "train.json"), train)
        torch.save(_tiny_network(bundle, infer).state_dict(), os.path.join(folder, "models", "model.pt"))
        bundle_dirs.append(folder)
    app = write_app(os.path.join(work, "app"), bundle_dirs, monaibundle_app_source(ENV_DIR))

    brain = load_datalist(brats[1], "training", brats[0])[:3]
    ct = [i for k in ("validation", "testing") for i in load_datalist(mosmed[1], k, mosmed[0])][:3]
    ct_annotated = [i["case"] for i in ct if "label" in i]
    assert len(ct_annotated) == 2, "the tiny MosMed dataset should hold two masked studies among these three"
    brain_ids = write_studies(brain, os.path.join(work, "brain"), with_labels=[i["case"] for i in brain[:2]])
    ct_ids = write_studies(ct, os.path.join(work, "ct"), with_labels=ct_annotated)
    # inference runs on a study that is not annotated
    unannotated_ct = next(c for c in ct_ids if c not in ct_annotated)
    studies = {
        HLWA: os.path.join(work, "brain", f"{brain_ids[2]}.nii.gz"),
        MEDSEGDIFF: os.path.join(work, "brain", f"{brain_ids[2]}.nii.gz"),
        COVID: os.path.join(work, "ct", f"{unannotated_ct}.nii.gz"),
    }

    servers = {
        "brain": Server(python, app, os.path.join(work, "brain"), BRAIN_MODELS, work),
        "ct": Server(python, app, os.path.join(work, "ct"), CT_MODELS, work),
    }
    try:
        for server in servers.values():
            server.wait()
        yield {"python": python, "work": work, "app": app, "studies": studies, "servers": servers}
    finally:
        for server in servers.values():
            server.stop()


def _server_for(served: dict, bundle: str) -> Server:
    return served["servers"]["ct" if bundle in CT_MODELS else "brain"]


def _infer(served: dict, bundle: str, name: str) -> nib.Nifti1Image:
    study = served["studies"][bundle]
    image_id = os.path.basename(study)[: -len(".nii.gz")]
    params = json.dumps(
        {"model_filename": "model.pt", "device": "cpu"}
    )  # explicit: the trained weights, whatever else models/ holds
    content = _server_for(served, bundle).post(
        f"/infer/{bundle}?image={image_id}&output=image", form={"params": params}
    )
    path = os.path.join(served["work"], name)
    with open(path, "wb") as f:
        f.write(content)
    return nib.load(path)


def test_servers_cannot_import_the_repository_common(served):
    """The servers' Python has no ``common``: what MONAI Label ran is the packaged ``scripts`` code."""
    proc = subprocess.run([served["python"], "-c", "import common"], cwd=served["work"], capture_output=True)
    assert proc.returncode != 0 and b"ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_infer_returns_label_volume_on_the_study_grid(served, bundle):
    study = nib.load(served["studies"][bundle])
    pred = _infer(served, bundle, f"{bundle}_pred.nii.gz")
    values = np.asarray(pred.dataobj)
    assert pred.shape == study.shape[:3], f"{bundle}: label {pred.shape} vs study {study.shape}"
    np.testing.assert_allclose(pred.affine, study.affine, atol=1e-4)
    assert np.array_equal(values, np.round(values)), f"{bundle}: not a label map"
    found = {int(v) for v in np.unique(values)}
    assert found <= LABEL_VALUES[bundle], f"{bundle}: label values {sorted(found)} outside {LABEL_VALUES[bundle]}"


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_train_writes_a_new_model_that_inference_uses(served, bundle):
    model = os.path.join(served["app"], "model", bundle, "models", "model.pt")
    with open(model, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "model_filename": "model.pt"}
    _server_for(served, bundle).post(f"/train/{bundle}?run_sync=true", params)
    with open(model, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() != before, f"{bundle}: training did not write models/model.pt"
    # the new file holds the network's weights: inference loads it (MONAI Label reloads on a newer file)
    state = torch.load(model, map_location="cpu", weights_only=True)
    expected = _tiny_network(bundle, _tiny_overrides(bundle)[0]).state_dict()
    assert set(state) == set(expected), f"{bundle}: model.pt keys differ from the network's"
    pred = _infer(served, bundle, f"{bundle}_pred_after_training.nii.gz")
    assert pred.shape == nib.load(served["studies"][bundle]).shape[:3]


def test_bundle_writers_do_not_run_inside_monailabel(served):
    """MONAI Label returns the label itself: the bundles' case writers (``writers``, not part of
    ``postprocessing``) never ran, so no prediction file was written into the app."""
    written = [
        os.path.join(root, f)
        for root, _, files in os.walk(served["app"])
        for f in files
        if f.endswith(("_seg.nii.gz", "_mean.nii.gz", "_uncertainty.nii.gz"))
    ]
    assert written == []
