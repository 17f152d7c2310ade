"""Tests of common/engines/acceleration.py: the AMP / channels-last / compile switches of the bundles' networks."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from torch import nn

from common.engines.acceleration import autocast_dtype, autocast_kwargs, prepare_network


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.ReLU(), nn.Conv3d(4, 1, 1))


def _record_conv_output(net: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    net[0].register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


def test_autocast_dtype_names():
    assert autocast_dtype("auto", "cpu") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16 and autocast_dtype("float16", "cpu") is torch.float16
    assert autocast_kwargs("fp16", torch.device("cpu")) == {"dtype": torch.float16}
    with pytest.raises(ValueError, match="amp_dtype"):
        autocast_dtype("float8", "cpu")
    with pytest.raises(ValueError, match="amp_dtype"):
        autocast_dtype(torch.float32, "cpu")


def test_amp_runs_the_forward_in_bfloat16_and_returns_float32():
    plain, prepared = _net(), _net()
    prepared.load_state_dict(plain.state_dict())
    keys = list(prepared.state_dict())
    prepare_network(prepared, "cpu", amp=True)
    inner = _record_conv_output(prepared)
    x = torch.randn(1, 2, 8, 8, 8)
    out = prepared(x)
    assert inner[0].dtype is torch.bfloat16 and out.dtype is torch.float32
    assert not torch.is_autocast_enabled("cpu")  # left after the call
    assert list(prepared.state_dict()) == keys  # no wrapper prefix: checkpoints load into the bare network
    torch.testing.assert_close(out, plain(x), atol=0.05, rtol=0.05)  # bfloat16 has 8 mantissa bits
    # an EMA copy (copy.deepcopy) autocasts too, with its own weights
    ema = copy.deepcopy(prepared)
    with torch.no_grad():
        ema[3].bias.add_(1.0)
    torch.testing.assert_close(ema(x), out + 1.0, atol=0.02, rtol=0.0)


def test_switches_must_be_bools():
    # fire hands `--amp false` over as the string "false", which is true
    with pytest.raises(ValueError, match="amp must be True or False, got 'false'"):
        prepare_network(_net(), "cpu", amp="false")


def test_an_error_inside_the_forward_leaves_autocast():
    prepared = prepare_network(_net(), "cpu", amp=True)
    with pytest.raises(RuntimeError):
        prepared(torch.randn(1, 3, 4, 4, 4))  # wrong channel count
    assert not torch.is_autocast_enabled("cpu")


def test_channels_last_converts_weights_and_inputs():
    plain, prepared = _net(), _net()
    prepared.load_state_dict(plain.state_dict())
    prepare_network(prepared, "cpu", channels_last=True)
    assert prepared[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    inputs: list[torch.Tensor] = []
    prepared.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))  # runs after prepare's hook
    x = torch.randn(1, 2, 6, 8, 8)
    torch.testing.assert_close(prepared(x), plain(x), atol=1e-5, rtol=1e-5)
    assert inputs[0].is_contiguous(memory_format=torch.channels_last_3d)
    net2d = prepare_network(nn.Sequential(nn.Conv2d(1, 2, 3)), "cpu", channels_last=True)
    assert net2d[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="mixes 2D and 3D"):
        prepare_network(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv3d(2, 2, 1)), "cpu", channels_last=True)


def _one_training_step(net: nn.Module, amp_dtype: str = "bfloat16") -> tuple[float, torch.Tensor]:
    """One MONAI SupervisedTrainer iteration on a MetaTensor batch (the same every call), as the bundles train."""
    data = torch.Generator().manual_seed(1)
    batch = {
        "image": MetaTensor(torch.randn(2, 2, 8, 8, 8, generator=data), affine=torch.eye(4)),
        "label": MetaTensor(torch.rand(2, 1, 8, 8, 8, generator=data), affine=torch.eye(4)),
    }
    before = net[0].weight.detach().clone()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=nn.MSELoss(),
        amp_kwargs=autocast_kwargs(amp_dtype, "cpu"),
    )
    trainer.run()
    return float(trainer.state.output[0]["loss"]), net[0].weight.detach() - before


def test_bf16_training_step_on_the_cpu_follows_the_float32_step():
    plain, prepared = _net(), _net()
    prepared.load_state_dict(plain.state_dict())
    loss32, step32 = _one_training_step(prepare_network(plain, "cpu"))
    prepare_network(prepared, "cpu", amp=True, amp_dtype="bfloat16", channels_last=True)
    inner = _record_conv_output(prepared)
    loss16, step16 = _one_training_step(prepared)
    assert inner[0].dtype is torch.bfloat16
    assert abs(loss16 - loss32) < 0.02 * loss32
    cosine = torch.nn.functional.cosine_similarity(step16.flatten(), step32.flatten(), dim=0)
    assert cosine > 0.99, f"the bf16 update points elsewhere (cosine {cosine:.3f})"


def test_compiled_training_step_on_the_cpu_equals_eager():
    eager, compiled = _net(), _net()
    compiled.load_state_dict(eager.state_dict())
    loss_eager, step_eager = _one_training_step(prepare_network(eager, "cpu"))
    prepare_network(compiled, "cpu", compile=True)
    keys = list(compiled.state_dict())
    loss_compiled, step_compiled = _one_training_step(compiled)
    assert abs(loss_compiled - loss_eager) < 1e-5
    torch.testing.assert_close(step_compiled, step_eager, atol=1e-5, rtol=1e-4)
    assert list(compiled.state_dict()) == keys == list(eager.state_dict())
    # a MetaTensor keeps its metadata through the compiled call
    out = compiled(MetaTensor(torch.randn(1, 2, 8, 8, 8), affine=2 * torch.eye(4)))
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, 2 * torch.eye(4).double())
