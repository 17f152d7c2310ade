"""Export a bundle's network with ``torch.export`` to an ExportedProgram (``.pt2``), beside MONAI's TorchScript
``ckpt_export``.

TorchScript is deprecated from torch 2.13 (``torch.jit.script`` warns); ``torch.export`` traces the network's
``forward`` to an ATen graph that ``torch.export.load(path).module()`` runs without this repository, and that
AOTInductor or ExecuTorch compile further. MONAI 1.6's bundle CLI has no ``torch.export`` command, hence this one:

    python tools/export_bundle.py --bundle_dir bundles/<bundle> --ckpt_file models/model.pt \\
        --filepath models/model.pt2 [--input_shape "[1, 4, 128, 128, 128]"]

``ckpt_export`` stays: the Model Zoo and MONAI Label load TorchScript. Like an ONNX graph, an ExportedProgram here
has fixed input sizes: by default those of the bundle's ONNX export (:func:`common.bundle.checks.onnx_input_shape`:
the metadata's input at ``n = p = 1``, or the config size its ``onnx_export`` names); ``input_shape`` picks another,
e.g. the sliding-window ROI. The harness checks the program against eager PyTorch
(:func:`common.bundle.checks.check_torch_export`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from common.io import atomic_path

__all__ = ["bundle_network", "export_bundle", "export_network"]


def bundle_network(bundle_dir: str, ckpt_file: str | None, overrides: dict[str, Any] | None = None):
    """``(network, parser)``: the inference config's ``network_def`` with ``overrides``, the checkpoint's weights
    loaded (``weights_only``) when ``ckpt_file`` is given, in eval mode on the CPU."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser.read_meta(os.path.join(bundle_dir, "configs", "metadata.json"))
    parser.update({"bundle_root": bundle_dir, **(overrides or {})})
    net = parser.get_parsed_content("network_def")
    if ckpt_file is not None:
        net.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    return net.eval(), parser


def export_network(
    network: torch.nn.Module, examples: tuple[torch.Tensor, ...], filepath: str
) -> torch.export.ExportedProgram:
    """``torch.export.export(network.eval(), examples)`` saved to ``filepath`` (atomically); returns the program."""
    with torch.no_grad():
        program = torch.export.export(network.eval(), tuple(examples))
    os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
    with atomic_path(filepath) as tmp:
        torch.export.save(program, tmp)
    return program


def export_bundle(
    bundle_dir: str,
    ckpt_file: str,
    filepath: str,
    input_shape: list[int] | tuple[int, ...] | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    """Export the bundle's network with the checkpoint's weights to ``filepath`` (``.pt2``); returns the path.

    Args:
        bundle_dir: the bundle folder.
        ckpt_file: the trained weights (``model.pt``, a state dict).
        filepath: where the ExportedProgram goes.
        input_shape: ``(1, C, *spatial)`` to export at; default that of the bundle's ONNX export.
        overrides: config overrides that make ``network_def`` match the checkpoint (e.g. a smaller test network).
    """
    from common.bundle.checks import onnx_export_settings, onnx_input_shape

    net, parser = bundle_network(bundle_dir, ckpt_file, overrides)
    shape = (
        tuple(int(s) for s in input_shape)
        if input_shape
        else onnx_input_shape(parser, onnx_export_settings(bundle_dir))
    )
    export_network(net, (torch.rand(shape, generator=torch.Generator().manual_seed(0)),), filepath)
    return filepath
