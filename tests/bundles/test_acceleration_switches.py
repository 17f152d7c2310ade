"""The speed switches of every bundle's configs (``amp``, ``amp_dtype``, ``channels_last``, ``compile``,
``gradient_checkpointing``) reach the network, and a bundle trains with them on the CPU.

The switches themselves are tested in tests/engines/test_acceleration.py and tests/networks/."""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser

from common.bundle.checks import _input_shape
from common.bundle.pipeline import load_pipeline, run_pipeline, stage_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES = os.path.join(REPO, "bundles")
SWITCHES = {"amp": True, "amp_dtype": "bfloat16", "channels_last": True, "device": "cpu"}
# every stage of every bundle's pipeline (bundle, config files, stage), except the GAN's pseudo-mask stage, which
# runs its fixed generator as it was trained
CONFIGS = [
    (bundle, [stage["config_file"]] if isinstance(stage["config_file"], str) else stage["config_file"], stage["name"])
    for bundle in sorted(os.listdir(BUNDLES))
    for stage in load_pipeline(os.path.join(BUNDLES, bundle))["stages"]
    if stage["name"] != "pseudo_masks"
]


def _parser(bundle: str, files: list[str], stage_name: str) -> ConfigParser:
    bundle_dir = os.path.join(BUNDLES, bundle)
    stage = next(s for s in load_pipeline(bundle_dir)["stages"] if s["name"] == stage_name)
    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_dir, f) for f in files])
    parser.read_meta(os.path.join(bundle_dir, "configs", "metadata.json"))
    parser.update({k: v for k, v in stage_overrides(stage, "test").items() if k.startswith("network_def")})
    parser.update({"bundle_root": bundle_dir, **SWITCHES})
    return parser


@pytest.mark.parametrize("bundle, files, stage", CONFIGS, ids=[f"{b}:{stage}" for b, _, stage in CONFIGS])
def test_switches_reach_the_network(bundle, files, stage):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parser = _parser(bundle, files, stage)
        net = parser.get_parsed_content("network").eval()
        convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        fmt = torch.channels_last_3d if isinstance(convs[0], torch.nn.Conv3d) else torch.channels_last
        assert all(c.weight.is_contiguous(memory_format=fmt) for c in convs), "channels_last not applied"
        dtypes = []
        convs[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
        if stage == "train_gan":  # the generator: not described by the metadata (that is the TransUNet's)
            x = torch.rand(1, 1, *parser.get_parsed_content("roi_size"))
        else:
            x = torch.rand(1, *_input_shape(parser))
        with torch.no_grad():
            out = net(x)
        assert set(dtypes) == {torch.bfloat16} and out.dtype == torch.float32
        if parser.get("network_def").get("gradient_checkpointing") is not None:
            parser["gradient_checkpointing"] = True
            fresh = parser.get_parsed_content("network_def", instantiate=True)
            assert any(getattr(m, "gradient_checkpointing", False) for m in fresh.modules())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_hlwa_trains_with_bf16_channels_last_and_checkpointing_on_the_cpu(tmp_path):
    bundle_dir = os.path.join(BUNDLES, "brats_mri_hlwa_segmentation")
    switches = {"amp": True, "amp_dtype": "bfloat16", "channels_last": True, "gradient_checkpointing": True}
    result = run_pipeline(
        bundle_dir, str(tmp_path), profile="test", stages=["train"], extra_overrides={"train": switches}
    )
    log = open(result.stage("train").log_file).read()
    assert os.path.isfile(os.path.join(str(tmp_path), "checkpoints", "model.pt")), log[-3000:]
    assert "--amp True" in " ".join(result.stage("train").command)
