"""The harness's ONNX check (``check_onnx_export``): per-bundle exporter settings, the command users run, planted
defects it reports, and MedSegDiff, whose FF-Parser (torch.fft) only the dynamo exporter translates; and the
``torch.export`` check (``check_torch_export``) on every bundle's network.

The harness (tests/test_bundles.py) runs the check on every bundle whose exporter this environment has; the
dynamo exporter needs ``onnxscript``, which is installed on the side here (``pip install --target`` into a cached
folder under ``.cache/``) when this environment lacks it.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from common.bundle import checks
from common.bundle.pipeline import load_pipeline, stage_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "tests", "example_bundle")
CACHE = os.path.join(REPO, ".cache", "onnxscript")
# onnxscript's own dependencies that this environment lacks (numpy, onnx, packaging, sympy, typing_extensions it has)
ONNXSCRIPT_DEPS = ("onnx-ir==1.1.0", "ml-dtypes==0.6.0")


def _bundle(name):
    return EXAMPLE if name == "example_bundle" else os.path.join(REPO, "bundles", name)


def _network_overrides(bundle_dir):
    stage = next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == "inference")
    return {k: v for k, v in stage_overrides(stage, "test").items() if k.startswith("network_def")}


def _checkpoint(bundle_dir, overrides, path):
    """Weights of the test-profile network, perturbed so that every parameter (FF-Parser filters too) matters."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser.update(overrides)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), path)
    return str(path)


def _copy_with_onnx_settings(name, tmp_path, settings):
    dst = tmp_path / name
    shutil.copytree(_bundle(name), dst)
    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["onnx_export"] = settings
    meta_path.write_text(json.dumps(meta, indent=4))
    return str(dst)


def test_settings_are_read_from_metadata_and_checked(tmp_path):
    assert checks.onnx_export_settings(EXAMPLE) == checks.ONNX_DEFAULTS
    fusion = checks.onnx_export_settings(_bundle("adni_mri_pet_dc2fusion"))
    assert fusion["opset_version"] == 20 and fusion["dynamo"] is False  # 3D GridSample exists from opset 20
    medsegdiff = checks.onnx_export_settings(_bundle("brats_mri_medsegdiff_segmentation"))
    assert medsegdiff["dynamo"] is True and medsegdiff["spatial_size_id"] == "network_def#ff_parser_size"
    bad = _copy_with_onnx_settings("example_bundle", tmp_path, {"opset_version": "17"})
    with pytest.raises(
        checks.BundleCheckError, match=r"example_bundle: .*onnx_export#opset_version has the wrong type"
    ):
        checks.onnx_export_settings(bad)


def test_command_hands_the_exporter_settings_to_torch():
    settings = {**checks.ONNX_DEFAULTS, "opset_version": 20, "dynamo": True}
    cmd = checks.onnx_export_command("/m/model.pt", "/o/model.onnx", (1, 5, 32, 32), settings, {"network_def#a": [1]})
    assert cmd[:5] == [sys.executable, "-m", "monai.bundle", "onnx_export", "network_def"]
    args = dict(zip(cmd[5::2], cmd[6::2]))
    assert args["--use_trace"] == "True"  # MONAI hands converter_kwargs to torch.onnx.export only when tracing
    assert args["--converter_kwargs"] == "{'opset_version': 20, 'dynamo': True}"
    assert args["--input_shape"] == "[1, 5, 32, 32]" and args["--network_def#a"] == "[1]"
    assert args["--ckpt_file"] == "/m/model.pt" and args["--filepath"] == "/o/model.onnx"


@pytest.mark.slow
def test_an_opset_without_3d_grid_sample_is_reported(tmp_path):
    bundle = _copy_with_onnx_settings("adni_mri_pet_dc2fusion", tmp_path, {"opset_version": 17})
    overrides = _network_overrides(bundle)
    ckpt = _checkpoint(bundle, overrides, tmp_path / "model.pt")
    with pytest.raises(checks.BundleCheckError) as err:
        checks.check_onnx_export(bundle, ckpt, str(tmp_path), overrides)
    message = str(err.value)
    assert message.startswith("bundle adni_mri_pet_dc2fusion: onnx_export (opset 17, dynamo=False) failed")
    assert "python -m monai.bundle onnx_export network_def" in message.replace(sys.executable, "python")
    assert re.search(r"GridSample with 5D", message)


@pytest.mark.slow
def test_a_difference_beyond_the_tolerance_is_reported(tmp_path):
    """Exact equality (atol = rtol = 0) is tighter than float error: the check must compare and say by how much."""
    bundle = _copy_with_onnx_settings("example_bundle", tmp_path, {"atol": 0.0, "rtol": 0.0})
    ckpt = _checkpoint(bundle, {}, tmp_path / "model.pt")
    with pytest.raises(checks.BundleCheckError, match=r"example_bundle: onnxruntime output differs from eager by \d"):
        checks.check_onnx_export(bundle, ckpt, str(tmp_path))
    exported = onnx.load(str(tmp_path / "model.onnx"))
    assert [(o.domain, o.version) for o in exported.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]


def _onnxscript_env():
    """This environment when it has onnxscript, else it with a cached ``pip install --target`` on PYTHONPATH."""
    if importlib.util.find_spec("onnxscript") is not None:
        return None
    with open(os.path.join(_bundle("brats_mri_medsegdiff_segmentation"), "configs", "metadata.json")) as f:
        pin = f"onnxscript=={json.load(f)['onnx_export']['packages']['onnxscript']}"
    target = os.path.join(CACHE, "-".join([pin, *ONNXSCRIPT_DEPS]).replace("==", "-"))
    if not os.path.isfile(os.path.join(target, ".complete")):
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, pin, *ONNXSCRIPT_DEPS]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"could not install {pin} for the dynamo exporter:\n{done.stderr[-2000:]}"
        open(os.path.join(target, ".complete"), "w").close()
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p))


@pytest.mark.slow
def test_medsegdiff_exports_its_fourier_filter_with_the_dynamo_exporter(tmp_path):
    bundle = _bundle("brats_mri_medsegdiff_segmentation")
    overrides = _network_overrides(bundle)
    ckpt = _checkpoint(bundle, overrides, tmp_path / "model.pt")
    onnx_file = checks.check_onnx_export(bundle, ckpt, str(tmp_path), overrides, env=_onnxscript_env())
    exported = onnx.load(onnx_file)
    assert ("", 20) in [(o.domain, o.version) for o in exported.opset_import]
    assert "DFT" in {node.op_type for node in exported.graph.node}  # the FF-Parser, not folded away
    # exported at the FF-Parser's size; a second input gives the eager result as well (not a traced constant)
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 5, *overrides["network_def#ff_parser_size"])
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.update(overrides)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    net.eval()
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected, atol=1e-4)


# ---------------------------------------------------------------- torch.export (ExportedProgram, .pt2)

BUNDLE_NAMES = sorted(os.listdir(os.path.join(REPO, "bundles")))


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_torch_export_program_equals_eager(name, tmp_path):
    bundle = _bundle(name)
    overrides = _network_overrides(bundle)
    ckpt = _checkpoint(bundle, overrides, tmp_path / "model.pt")
    pt2 = checks.check_torch_export(bundle, ckpt, str(tmp_path), overrides, atol=1e-5, rtol=1e-5)
    # the check compared real outputs: the loaded program answers two inputs differently, as eager does
    from common.bundle.export import bundle_network

    net, parser = bundle_network(bundle, ckpt, overrides)
    program = torch.export.load(pt2).module()
    shape = checks.onnx_input_shape(parser, checks.onnx_export_settings(bundle))
    a, b = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        assert not torch.allclose(program(a), program(b))
        torch.testing.assert_close(program(b), net(b), atol=1e-5, rtol=1e-5)


def test_torch_export_of_the_gan_generator_equals_eager(tmp_path):
    """The COVID bundle's exported network is the TransUNet; its GAN generator (train_gan.json) exports as well."""
    from monai.bundle import ConfigParser

    from common.bundle.export import export_network

    parser = ConfigParser()
    parser.read_config(os.path.join(_bundle("covid_ct_gan_transunet_segmentation"), "configs", "train_gan.json"))
    torch.manual_seed(0)
    generator = parser.get_parsed_content("network_def").eval()
    x = torch.rand(1, 1, 16, 32, 32)
    noise = torch.rand(generator.noise_shape(x.shape))  # passed explicitly: by default each call draws its own
    export_network(generator, (x, noise), str(tmp_path / "generator.pt2"))
    program = torch.export.load(str(tmp_path / "generator.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x, noise), generator(x, noise), atol=1e-5, rtol=1e-5)


def test_a_failing_torch_export_is_reported_and_leaves_no_file(tmp_path):
    # a checkpoint of a 3-channel network, exported at the metadata's 4-channel input: the trace fails
    overrides = {"network_def#in_channels": 3}
    ckpt = _checkpoint(EXAMPLE, overrides, tmp_path / "model.pt")
    with pytest.raises(checks.BundleCheckError, match=r"example_bundle: torch.export failed: \w+"):
        checks.check_torch_export(EXAMPLE, ckpt, str(tmp_path), overrides)
    assert not [f for f in os.listdir(tmp_path) if "pt2" in f]
