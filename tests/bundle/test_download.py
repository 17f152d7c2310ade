"""Download and run a packaged bundle the way a user does, with no `common` in reach.

Each bundle, with the weights of its tiny test-profile network in ``models/model.pt``, is packaged and served over
HTTP on 127.0.0.1, fetched with ``python -m monai.bundle download --name NAME --url URL --bundle_dir DIR`` and run
(``python -m monai.bundle run --config_file <abs>/configs/inference.json --bundle_root <abs> ...``) from an
unrelated working directory:

- every bundle in this environment, with an import hook that makes ``import common`` fail;
- one bundle in a fresh virtual environment (``python3 -m venv``, no system site packages) holding only the
  packages its metadata names, at the versions pinned there. It is built once and cached under ``.cache/`` (keyed
  by the package list), so reruns are quick; the first build downloads from the package index.

The outputs have the input's shape and affine (the harness's check) and equal, voxel for voxel, those of the
repository's own bundle run on the same data with the same weights.
"""

import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
import torch

from common.bundle.checks import check_inference_outputs
from common.bundle.package import package_bundle
from common.bundle.pipeline import PipelineResult, load_pipeline, prepare_data, run_stage, stage_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES = sorted(
    p for p in os.listdir(os.path.join(REPO, "bundles")) if os.path.isdir(os.path.join(REPO, "bundles", p))
)
CLEAN_ENV_BUNDLE = "adni_mri_pet_dc2fusion"  # the bundle with the lightest package list: the build stays short
ENV_CACHE = os.path.join(REPO, ".cache", "bundle-envs")

# `python -c BLOCK_COMMON <monai.bundle arguments>`: python -m monai.bundle, with `import common` failing
BLOCK_COMMON = """
import importlib.abc, runpy, sys
class BlockCommon(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "common" or name.startswith("common."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the download test)", name=name)
sys.meta_path.insert(0, BlockCommon())
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


@dataclass
class Case:
    """One bundle as served: its zip's URL, the data, the repository's reference outputs and the overrides."""

    name: str
    url: str
    dataset_dir: str
    datalist: str
    reference_dir: str
    stage: dict
    overrides: dict


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature of the method it overrides
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Package every bundle with tiny weights and serve the zips; then, two at a time (CI has 2 cores), run the
    repository's own inference, download and run each zip with `common` blocked, and build the clean environment.

    Yields ``(cases, jobs)``: ``jobs[(kind, name)]`` is a future, so a failure is reported by the test of its bundle.
    """
    root = tmp_path_factory.mktemp("download")
    zips, bundles_root = root / "zips", root / "bundles"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(zips)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        cases, jobs = {}, {}
        for name in BUNDLES:
            src = os.path.join(REPO, "bundles", name)
            shutil.copytree(src, bundles_root / name, ignore=shutil.ignore_patterns("__pycache__"))
            stage = next(s for s in load_pipeline(src)["stages"] if s["name"] == "inference")
            overrides = stage_overrides(stage, "test")
            weights = bundles_root / name / "models" / "model.pt"
            torch.save(_tiny_network_state(src, overrides), weights)
            zip_path = package_bundle(name, str(zips), bundles_root=str(bundles_root))
            dataset_dir, datalist = prepare_data(src, str(root / "data"))
            url = f"{base_url}/{os.path.basename(zip_path)}"
            cases[name] = Case(name, url, dataset_dir, datalist, str(root / "reference" / name), stage, overrides)
        # the clean environment first: its build (downloads, unpacking) overlaps the bundle runs
        jobs["env"] = pool.submit(_bundle_env, _metadata_requirements(CLEAN_ENV_BUNDLE))
        for name, case in cases.items():
            run = {
                "dataset_dir": case.dataset_dir,
                "data_list_file_path": case.datalist,
                "output_dir": case.reference_dir,
                "ckpt_path": str(bundles_root / name / "models" / "model.pt"),
                "device": "cpu",
                **case.overrides,
            }
            log = str(root / "logs" / f"{name}_reference.log")
            jobs[("reference", name)] = pool.submit(
                run_stage, os.path.join(REPO, "bundles", name), case.stage, run, log
            )
            work = tmp_path_factory.mktemp(f"blocked_{name}")
            jobs[("blocked", name)] = pool.submit(_download_and_infer, case, [sys.executable, "-c", BLOCK_COMMON], work)
        yield cases, jobs
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        server.shutdown()
        server.server_close()


def _tiny_network_state(bundle_dir, overrides):
    """The inference network of the test profile, seeded and perturbed so that every weight matters."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser.update({k: v for k, v in overrides.items() if k.startswith("network_def")})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.state_dict()


def _run(cmd, cwd, env, what):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        pytest.fail(f"{what} exited with {done.returncode}\n$ {' '.join(cmd)}\n{tail}")
    return done


def _clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def _download_and_infer(case, python_prefix, work):
    """Download ``case`` into an empty folder, run its inference from another folder; return the outputs' folder."""
    downloads, elsewhere = work / "downloads", work / "elsewhere"
    downloads.mkdir()
    elsewhere.mkdir()
    env = _clean_env()
    _run(
        [*python_prefix, "download", "--name", case.name, "--url", case.url, "--bundle_dir", str(downloads)],
        elsewhere,
        env,
        f"download of {case.name}",
    )
    bundle = downloads / case.name
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "models" / "model.pt").is_file()
    out = work / "run" / "inference"  # the harness reads <work_dir>/inference
    cmd = [*python_prefix, "run", "--config_file", str(bundle / "configs" / "inference.json")]
    cmd += ["--bundle_root", str(bundle), "--dataset_dir", case.dataset_dir, "--data_list_file_path", case.datalist]
    cmd += ["--output_dir", str(out), "--device", "cpu"]
    for key, value in case.overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    _run(cmd, elsewhere, env, f"inference of the downloaded {case.name}")
    return out


def _check_outputs(case, out):
    """The harness's shape/affine check, then the same voxels as the repository's own run."""
    bundle_dir = os.path.join(REPO, "bundles", case.name)
    result = PipelineResult(case.name, case.dataset_dir, case.datalist, os.path.dirname(out))
    checked = check_inference_outputs(bundle_dir, result)
    written = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert written == sorted(f for f in os.listdir(case.reference_dir) if f.endswith(".nii.gz"))
    assert {os.path.basename(c) for c in checked} <= set(written)
    for filename in written:
        got, expected = nib.load(os.path.join(out, filename)), nib.load(os.path.join(case.reference_dir, filename))
        np.testing.assert_allclose(got.affine, expected.affine, atol=1e-6)
        a, b = np.asarray(got.dataobj), np.asarray(expected.dataobj)
        assert a.dtype == b.dtype and a.shape == b.shape, filename
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{case.name}: {filename} differs from the repository's")


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_downloaded_bundle_infers_without_common(served, name):
    cases, jobs = served
    jobs[("reference", name)].result()
    _check_outputs(cases[name], jobs[("blocked", name)].result())


def _metadata_requirements(name):
    with open(os.path.join(REPO, "bundles", name, "configs", "metadata.json")) as f:
        meta = json.load(f)
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pins.update(meta["required_packages_version"])
    return sorted(f"{dist}=={version}" for dist, version in pins.items())


def _bundle_env(requirements):
    """A virtual environment holding exactly ``requirements`` (and what they depend on), built once and cached."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], sys.platform, requirements]).encode()).hexdigest()[:16]
    env_dir = os.path.join(ENV_CACHE, key)
    python = os.path.join(env_dir, "bin", "python")
    marker = os.path.join(env_dir, ".complete")
    os.makedirs(ENV_CACHE, exist_ok=True)
    with open(os.path.join(ENV_CACHE, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test run waits for the first build instead of racing it
        if not os.path.isfile(marker):
            shutil.rmtree(env_dir, ignore_errors=True)
            env = _clean_env()
            _run([sys.executable, "-m", "venv", env_dir], ENV_CACHE, env, "python3 -m venv")
            _run([python, "-m", "pip", "install", "-q", *requirements], ENV_CACHE, env, "pip install")
            with open(marker, "w") as f:
                f.write("\n".join(requirements) + "\n")
    return python


@pytest.mark.slow
def test_bundle_runs_with_only_the_packages_its_metadata_names(served, tmp_path):
    cases, jobs = served
    python = jobs["env"].result()
    with open(os.path.join(os.path.dirname(os.path.dirname(python)), "pyvenv.cfg")) as f:
        assert "include-system-site-packages = false" in f.read()  # its own packages only
    probe = subprocess.run(
        [python, "-c", "import common"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'common'" in probe.stderr
    out = _download_and_infer(cases[CLEAN_ENV_BUNDLE], [python, "-m", "monai.bundle"], tmp_path)
    jobs[("reference", CLEAN_ENV_BUNDLE)].result()
    _check_outputs(cases[CLEAN_ENV_BUNDLE], out)
