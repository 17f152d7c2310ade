"""Tests for common/engines/diffusion.py: mask-diffusion training batches, training forward, slice-wise sampling."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from common.engines.diffusion import (
    DiffusionSegmentationInferer,
    DiffusionSegmentationTrainingInferer,
    SegmentationDiffusionPrepareBatch,
    mask_to_signal,
    signal_to_mask,
)
from common.losses.diffusion_segmentation import DiffusionSegmentationLoss
from common.networks.clipped_ddim import ClippedDDIMScheduler
from common.networks.dpm_solver import DPMSolverMultistepScheduler
from common.networks.medsegdiff import MedSegDiff


@pytest.fixture(autouse=True)
def _seed_and_single_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OracleDenoiser(nn.Module):
    """Predicts exactly the noise that makes ``x0_hat`` equal ``2 * (context > 0) - 1`` channel by channel.

    With it, every reverse step predicts the same clean mask, so a correct sampler returns that mask exactly.
    Records the batch size of every call.
    """

    def __init__(self, scheduler, out_channels: int = 1) -> None:
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.out_channels = out_channels
        self.calls: list[int] = []

    def forward(self, x, timesteps, context):
        self.calls.append(x.shape[0])
        target = mask_to_signal((context[:, : self.out_channels] > 0).float())
        alpha_bar = self.alphas_cumprod[timesteps.long()].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - alpha_bar.sqrt() * target) / (1 - alpha_bar).sqrt()


def test_mask_signal_round_trip():
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(mask_to_signal(mask), torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    torch.testing.assert_close(signal_to_mask(mask_to_signal(mask)), mask)


def test_prepare_batch_noises_the_mask_and_conditions_on_the_image():
    batch = {"image": torch.randn(3, 4, 8, 8), "label": (torch.rand(3, 2, 8, 8) > 0.5).float()}
    x_0, target, args, kwargs = SegmentationDiffusionPrepareBatch(num_train_timesteps=50)(batch)
    torch.testing.assert_close(x_0, batch["label"] * 2 - 1)
    assert target.shape == (3, 4, 8, 8) and args == ()
    torch.testing.assert_close(target[:, :2], kwargs["noise"])  # eps first, then x_0
    torch.testing.assert_close(target[:, 2:], x_0)
    torch.testing.assert_close(kwargs["condition"], batch["image"])
    assert kwargs["timesteps"].shape == (3,) and 0 <= int(kwargs["timesteps"].min()) < 50 > int(
        kwargs["timesteps"].max()
    )


def test_prepare_batch_rejects_label_maps():
    batch = {"image": torch.randn(1, 4, 8, 8), "label": torch.full((1, 1, 8, 8), 4.0)}
    with pytest.raises(ValueError, match="mask in \\[0, 1\\]"):
        SegmentationDiffusionPrepareBatch(1000)(batch)
    with pytest.raises(ValueError, match="dictionary"):
        SegmentationDiffusionPrepareBatch(1000)({"image": torch.randn(1, 4, 8, 8)})


def test_training_inferer_returns_noise_prediction_and_exact_x0_for_an_oracle():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    image = mask.repeat(1, 4, 1, 1) - 0.5  # the oracle reads the mask back from the image
    x_0, _, _, kwargs = SegmentationDiffusionPrepareBatch(1000)({"image": image, "label": mask})
    oracle = OracleDenoiser(scheduler)
    pred = DiffusionSegmentationTrainingInferer(scheduler)(x_0, oracle, **kwargs)
    assert pred.shape == (2, 2, 8, 8)
    plain = DiffusionInferer(scheduler)(x_0, oracle, kwargs["noise"], kwargs["timesteps"], condition=image)
    torch.testing.assert_close(pred[:, :1], plain)  # eps_hat as MONAI's DiffusionInferer computes it
    torch.testing.assert_close(pred[:, 1:], x_0, atol=1e-3, rtol=0)  # the oracle's eps gives back x_0
    torch.testing.assert_close(pred[:, :1], kwargs["noise"], atol=1e-3, rtol=0)


def test_trainer_loss_falls_on_a_fixed_batch():
    """MONAI's SupervisedTrainer with the engine pieces: the loss on one fixed batch (fixed noise and t) falls."""

    class FixedPrepareBatch(SegmentationDiffusionPrepareBatch):
        def get_noise(self, images):
            return torch.randn(images.shape, generator=torch.Generator().manual_seed(1))

        def get_timesteps(self, images):
            return torch.tensor([50, 400, 800])[: images.shape[0]]

    net = MedSegDiff(channels=(8, 16), attention_levels=(False, True), norm_num_groups=4, num_heads=2, ff_parser_size=8)
    image = torch.randn(3, 4, 8, 8)
    data = [{"image": image[i], "label": (image[i, :1] > 0).float()} for i in range(3)]
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=15,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=3),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 2e-3),
        loss_function=DiffusionSegmentationLoss(x0_weight=0.1),
        inferer=DiffusionSegmentationTrainingInferer(DDPMScheduler(1000)),
        prepare_batch=FixedPrepareBatch(1000),
        decollate=False,
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 15 and losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("slice_axis", [-1, 0])
@pytest.mark.parametrize(
    ("scheduler", "steps"),
    [
        (DDIMScheduler(num_train_timesteps=1000), 4),
        (ClippedDDIMScheduler(1000), 7),
        (DPMSolverMultistepScheduler(1000), 7),
        (DDPMScheduler(30), 30),
    ],
)
def test_slicewise_sampling_recovers_the_oracle_mask(scheduler, steps, slice_axis):
    volume = torch.randn(1, 4, 6, 8, 5)
    volume[..., 3] = 0.0  # an empty slice along the last axis
    oracle = OracleDenoiser(scheduler, out_channels=2)
    inferer = DiffusionSegmentationInferer(
        scheduler, num_inference_steps=steps, num_ensemble=3, out_channels=2, slice_axis=slice_axis, batch_size=7
    )
    out = inferer(MetaTensor(volume, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))), oracle)
    assert isinstance(out, MetaTensor) and out.shape == (1, 6, 6, 8, 5)
    torch.testing.assert_close(out.affine, torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))
    expected = (volume[:, :2] > 0).float()
    for member in range(3):  # sample-major channels: member n, mask channel c at n * 2 + c
        torch.testing.assert_close(out.as_tensor()[:, 2 * member : 2 * member + 2], expected)
    assert max(oracle.calls) <= 7


def _tiny_net() -> MedSegDiff:
    net = MedSegDiff(channels=(8, 16), attention_levels=(False, True), norm_num_groups=4, num_heads=2, ff_parser_size=8)
    return net.eval()


@pytest.mark.parametrize(
    "scheduler", [ClippedDDIMScheduler(1000), DPMSolverMultistepScheduler(1000)], ids=["ddim", "dpm_solver"]
)
def test_whole_volume_sampling_equals_slice_by_slice(scheduler):
    """Same noise per (slice, member), so a deterministic sampler gives each slice the same mask however it is
    batched: the whole volume in one chain (calls of 7 pairs) or every slice alone with one pair per call."""
    net = _tiny_net()
    volume = torch.randn(1, 4, 8, 8, 5)
    volume[..., 1] = 0.0  # an empty slice
    steps, members = 3, 2
    calls = []
    net.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    kwargs = {"num_inference_steps": steps, "num_ensemble": members, "seed": 5}
    whole = DiffusionSegmentationInferer(scheduler, batch_size=7, **kwargs)(volume, net)
    assert calls == [7, 1] * steps  # 4 slices x 2 members = 8 pairs, one loop over the timesteps
    single = DiffusionSegmentationInferer(scheduler, batch_size=1, **kwargs)
    for z in range(5):
        alone = single.sample(volume[..., z], net, keys=[(0, z)])
        torch.testing.assert_close(whole[..., z], alone, atol=0, rtol=0)
    assert whole[..., 1].sum() == 0
    assert 0 < whole.mean() < 1  # a random network, so neither all background nor all foreground
    other_seed = DiffusionSegmentationInferer(scheduler, batch_size=7, **{**kwargs, "seed": 6})(volume, net)
    assert not torch.equal(other_seed, whole)


def test_initial_noise_is_fixed_per_image_and_member():
    inferer = DiffusionSegmentationInferer(ClippedDDIMScheduler(1000), num_ensemble=3, seed=1)
    noise = inferer.initial_noise([(0, 0), (0, 1), (2, 7)], (1, 4, 4), torch.device("cpu"))
    assert noise.shape == (9, 1, 4, 4)
    torch.testing.assert_close(inferer.initial_noise([(2, 7)], (1, 4, 4), torch.device("cpu")), noise[6:])
    assert len({tuple(n.flatten().tolist()) for n in noise}) == 9  # every pair its own noise


def test_ddpm_sampling_does_not_depend_on_the_batch_size():
    """The step noise is drawn for all pairs at once, so the network-call size cannot change a DDPM sample."""
    net = _tiny_net()
    images = torch.randn(3, 4, 8, 8)
    kwargs = {"num_inference_steps": 20, "num_ensemble": 2}
    small = DiffusionSegmentationInferer(DDPMScheduler(20), batch_size=1, **kwargs)(images, net)
    large = DiffusionSegmentationInferer(DDPMScheduler(20), batch_size=64, **kwargs)(images, net)
    torch.testing.assert_close(small, large, atol=0, rtol=0)


def test_empty_slices_are_not_sampled():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    volume = torch.zeros(1, 4, 8, 8, 6)
    volume[..., 2] = torch.randn(4, 8, 8)
    oracle = OracleDenoiser(scheduler)
    inferer = DiffusionSegmentationInferer(scheduler, num_inference_steps=3, num_ensemble=2, batch_size=64)
    out = inferer(volume, oracle)
    assert oracle.calls == [2, 2, 2]  # one non-empty slice x 2 members, 3 steps
    assert out[..., [0, 1, 3, 4, 5]].sum() == 0
    keep_all = DiffusionSegmentationInferer(scheduler, num_inference_steps=3, num_ensemble=2, skip_empty=False)
    oracle.calls.clear()
    keep_all(volume, oracle)
    assert oracle.calls == [12, 12, 12]


def test_voxels_outside_the_image_support_are_background():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    image = torch.randn(1, 4, 8, 8)
    image[0, :, :2] = 0.0  # two rows outside the skull-stripped brain
    everywhere = OracleDenoiser(scheduler)  # given a positive context, it marks every voxel

    class AllForeground(nn.Module):
        def forward(self, x, timesteps, context):
            return everywhere(x, timesteps, torch.ones_like(context))

    kwargs = {"num_inference_steps": 3, "num_ensemble": 1}
    kept = DiffusionSegmentationInferer(scheduler, **kwargs)(image, AllForeground())
    assert kept[0, 0, :2].sum() == 0 and kept[0, 0, 2:].sum() == 48
    raw = DiffusionSegmentationInferer(scheduler, zero_outside=False, **kwargs)(image, AllForeground())
    assert raw.sum() == 64


def test_ensemble_members_differ_for_a_random_network():
    inferer = DiffusionSegmentationInferer(DDIMScheduler(1000), num_inference_steps=2, num_ensemble=4)
    out = inferer(torch.randn(2, 4, 8, 8), _tiny_net())
    assert out.shape == (2, 4, 8, 8) and set(out.unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(out[0, n].flatten().tolist()) for n in range(4)}) > 1  # different noise, different samples


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": DDPMScheduler(1000), "num_inference_steps": 50}, "DDPMScheduler samples only"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2000}, "num_inference_steps"),
        ({"num_ensemble": 0}, "num_ensemble"),
        ({"out_channels": 0}, "out_channels"),
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"slice_axis": 3}, "slice_axis"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    arguments = {"scheduler": DDIMScheduler(1000), **kwargs}
    with pytest.raises(ValueError, match=match):
        DiffusionSegmentationInferer(**arguments)


def test_sampler_rejects_inputs_of_the_wrong_rank():
    inferer = DiffusionSegmentationInferer(DDIMScheduler(1000), num_inference_steps=2, spatial_dims=3)
    with pytest.raises(ValueError, match="3 spatial dims"):
        inferer(torch.randn(1, 4, 8, 8), nn.Identity())
