"""Diffusion segmentation with MONAI engines: training batches, the training forward and slice-wise ensemble sampling.

MedSegDiff (Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic Model", MIDL 2023,
arXiv 2211.00611) treats a segmentation mask as the sample of a conditional diffusion model: the mask, scaled to
``[-1, 1]``, is noised as ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and a network ``eps_theta(x_t, I, t)``
predicts ``eps`` given the image ``I``. MONAI provides the pieces this module composes:

- the schedulers (``monai.networks.schedulers.DDPMScheduler`` for training, DDPM or ``DDIMScheduler`` for
  sampling) own the diffusion maths;
- ``monai.inferers.DiffusionInferer`` runs the training forward (noise the input, call the network) and the
  reverse chain (:meth:`~monai.inferers.DiffusionInferer.sample`);
- ``monai.engines.utils.DiffusionPrepareBatch`` draws the noise and timesteps of a training batch.

What MONAI's versions do not cover, hence the classes here:

- :class:`SegmentationDiffusionPrepareBatch`: ``DiffusionPrepareBatch`` noises the batch's *image* and conditions
  on another key; here the *label* (the mask, mapped to ``[-1, 1]``) is noised and the image is the condition,
  and the target carries ``x_0`` next to ``eps`` for the optional auxiliary loss on the predicted ``x_0``.
- :class:`DiffusionSegmentationTrainingInferer`: ``DiffusionInferer.__call__`` returns ``eps_hat`` only; this one
  also returns ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` (the quantity of the auxiliary loss,
  :class:`~common.losses.diffusion_segmentation.DiffusionSegmentationLoss`), which needs the timesteps that only
  the inferer sees.
- :class:`DiffusionSegmentationInferer`: ``DiffusionInferer.sample`` draws one sample of one batch; segmenting a
  3D volume with a 2D model needs the volume cut into slices, batched, an ensemble of ``num_ensemble`` samples per
  slice (fused afterwards by :class:`~common.data.ensemble_fusion.FuseEnsembled`), the samples thresholded back to
  masks, and slices outside the body skipped.

For DDIM sampling of masks use :class:`~common.networks.clipped_ddim.ClippedDDIMScheduler` (see there why MONAI's
``DDIMScheduler`` step drifts on clipped samples).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDPMScheduler, Scheduler
from monai.utils import convert_to_dst_type

__all__ = [
    "DiffusionSegmentationInferer",
    "DiffusionSegmentationTrainingInferer",
    "SegmentationDiffusionPrepareBatch",
    "mask_to_signal",
    "signal_to_mask",
]


def mask_to_signal(mask: torch.Tensor) -> torch.Tensor:
    """Map a mask in ``[0, 1]`` to the diffusion signal range ``[-1, 1]``: ``x_0 = 2 m - 1``."""
    return mask * 2.0 - 1.0


def signal_to_mask(signal: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Binary mask (float 0/1) from a sampled signal in ``[-1, 1]``: foreground where ``x_0 > threshold``."""
    return (signal > threshold).to(signal.dtype)


class SegmentationDiffusionPrepareBatch(DiffusionPrepareBatch):
    """``prepare_batch`` of a ``SupervisedTrainer`` that trains a mask-diffusion model (MedSegDiff).

    From a batch ``{"image": (B, C_in, *S), "label": (B, C_out, *S)}`` with the label a mask in ``[0, 1]`` it returns
    ``(x_0, target, (), kwargs)``:

    - ``x_0 = 2 * label - 1`` ``(B, C_out, *S)``, the sample that the inferer noises;
    - ``target = cat([eps, x_0], dim=1)`` ``(B, 2 C_out, *S)``: the noise (the regression target of eps-prediction)
      and the clean mask (the target of the optional auxiliary loss);
    - ``kwargs = {"noise": eps, "timesteps": t, "condition": image}`` for
      :class:`DiffusionSegmentationTrainingInferer`, with ``eps ~ N(0, I)`` and ``t`` uniform in
      ``[0, num_train_timesteps)`` per sample (as ``DiffusionPrepareBatch`` draws them).

    Args:
        num_train_timesteps: ``T`` of the training scheduler (1000 in MedSegDiff).
        image_key: key of the image (the condition).
        label_key: key of the mask (the diffused sample).
    """

    def __init__(self, num_train_timesteps: int, image_key: str = "image", label_key: str = "label") -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}.")
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=image_key)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata or self.label_key not in batchdata:
            raise ValueError(
                f"SegmentationDiffusionPrepareBatch needs a dictionary batch with {self.image_key!r} and "
                f"{self.label_key!r}."
            )
        image = batchdata[self.image_key].to(device, non_blocking=non_blocking, **kwargs)
        mask = batchdata[self.label_key].to(device, non_blocking=non_blocking, **kwargs)
        if image.shape[0] != mask.shape[0] or image.shape[2:] != mask.shape[2:]:
            raise ValueError(
                f"image {tuple(image.shape)} and label {tuple(mask.shape)} must share the batch and spatial sizes."
            )
        if mask.numel() and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(
                f"the label must be a mask in [0, 1], got values in [{float(mask.min())}, {float(mask.max())}]; "
                "convert label maps to region masks first (common.data.labels.LabelsToRegionsd)."
            )
        x_0 = mask_to_signal(mask.float())
        noise = self.get_noise(x_0)
        timesteps = self.get_timesteps(x_0)
        target = torch.cat([noise, x_0], dim=1)
        return x_0, target, (), {"noise": noise, "timesteps": timesteps, "condition": image}


class DiffusionSegmentationTrainingInferer(DiffusionInferer):
    """Training forward of mask diffusion: ``[eps_hat, x0_hat]`` stacked on the channel axis.

    ``eps_hat = net(x=x_t, timesteps=t, context=image)`` exactly as ``DiffusionInferer.__call__`` computes it (with
    ``x_t = scheduler.add_noise(x_0, eps, t)``), then the clean-mask estimate of that step,
    ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``. Shapes: ``inputs (B, C, *S) -> (B, 2C, *S)``.
    Pair it with :class:`SegmentationDiffusionPrepareBatch` and
    :class:`~common.losses.diffusion_segmentation.DiffusionSegmentationLoss`.

    Args:
        scheduler: the training scheduler (``DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")``).
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        eps_hat = super().__call__(inputs, diffusion_model, noise, timesteps, condition=condition, mode=mode, seg=seg)
        x_t = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        alpha_bar = self.scheduler.alphas_cumprod.to(device=inputs.device, dtype=eps_hat.dtype)[timesteps.long()]
        alpha_bar = alpha_bar.reshape(-1, *([1] * (inputs.ndim - 1)))
        x0_hat = (x_t - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()
        return torch.cat([eps_hat, x0_hat], dim=1)


class DiffusionSegmentationInferer(Inferer):
    """Sample an ensemble of segmentations of each image, slice by slice for a 2D model on volumes.

    ``__call__(inputs, network)``:

    - 2D model (``spatial_dims=2``) on volumes ``(B, C_in, H, W, D)``: the volume is cut into slices along
      ``slice_axis`` (default the last, axial after ``Orientationd("RAS")``), the slices are sampled in batches of
      ``batch_size`` (slices x ensemble members) and stacked back: ``-> (B, N * C_out, H, W, D)``;
    - inputs with ``spatial_dims`` spatial axes (2D slices, or volumes for a 3D model): ``(B, C_in, *S) ->
      (B, N * C_out, *S)``.

    Each of the ``N = num_ensemble`` samples starts from its own Gaussian noise and runs the reverse chain of
    ``scheduler`` (``DiffusionInferer.sample``, ``num_inference_steps`` steps, the image as ``context``); the final
    ``x_0`` in ``[-1, 1]`` is thresholded at ``threshold`` (default 0) into a 0/1 mask. Channels are sample-major:
    channel ``n * C_out + c`` is sample ``n`` of mask channel ``c``; fuse them with
    :class:`~common.data.ensemble_fusion.FuseEnsembled`. Slices whose image is 0 everywhere (outside the
    skull-stripped brain) are not sampled and get an empty mask when ``skip_empty`` is true (default): a large
    saving on brain MRI, where a third of the axial slices are empty. With ``zero_outside`` (default) voxels whose
    image is 0 in every channel (background of a skull-stripped scan) are set to background in every sample. The
    result has the type and metadata of ``inputs`` (a ``MetaTensor`` stays one, so ``Invertd`` can map it back to
    the input grid).

    Samplers: :class:`~common.networks.clipped_ddim.ClippedDDIMScheduler` (the bundle's DDIM: the noise re-derived
    from the clipped ``x_0``, as guided-diffusion samples masks) or MONAI's ``DDIMScheduler``, with any
    ``num_inference_steps`` (deterministic chain, eta 0); ``DDPMScheduler`` only with ``num_inference_steps ==
    num_train_timesteps``, because MONAI's ``DDPMScheduler.step`` always steps from ``t`` to ``t - 1`` (its
    posterior coefficients assume unit strides), so a strided DDPM chain would be wrong.

    Args:
        scheduler: sampling scheduler (same noise schedule as training).
        num_inference_steps: steps of the reverse chain.
        num_ensemble: samples per image ``N`` (MedSegDiff uses 5).
        out_channels: mask channels ``C_out`` of the network (1 for whole tumour, 3 for TC/WT/ET).
        spatial_dims: spatial dimensions of the network, 2 (slice-wise on volumes) or 3.
        slice_axis: spatial axis (0, 1, 2, or -1 for the last) along which a volume is sliced for a 2D network.
        batch_size: (slice, sample) pairs per network call.
        skip_empty: give all-zero images an empty mask without sampling.
        zero_outside: set voxels whose image is 0 in every channel to background.
        threshold: foreground where the sampled ``x_0`` exceeds this.
        progress: show a progress bar per reverse chain.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        num_inference_steps: int = 50,
        num_ensemble: int = 5,
        out_channels: int = 1,
        spatial_dims: int = 2,
        slice_axis: int = -1,
        batch_size: int = 32,
        skip_empty: bool = True,
        zero_outside: bool = True,
        threshold: float = 0.0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= num_inference_steps <= scheduler.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {scheduler.num_train_timesteps}], got {num_inference_steps}."
            )
        if isinstance(scheduler, DDPMScheduler) and num_inference_steps != scheduler.num_train_timesteps:
            raise ValueError(
                f"DDPMScheduler samples only with num_inference_steps == num_train_timesteps "
                f"({scheduler.num_train_timesteps}), got {num_inference_steps}: its step assumes unit strides. "
                "Use DDIMScheduler for fewer steps."
            )
        if num_ensemble < 1:
            raise ValueError(f"num_ensemble must be at least 1, got {num_ensemble}.")
        if out_channels < 1:
            raise ValueError(f"out_channels must be at least 1, got {out_channels}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if slice_axis not in (-1, 0, 1, 2):
            raise ValueError(f"slice_axis must be -1, 0, 1 or 2 (a spatial axis of a volume), got {slice_axis}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.num_ensemble = int(num_ensemble)
        self.out_channels = int(out_channels)
        self.spatial_dims = spatial_dims
        self.slice_axis = slice_axis
        self.batch_size = int(batch_size)
        self.skip_empty = skip_empty
        self.zero_outside = zero_outside
        self.threshold = float(threshold)
        self.progress = progress
        self._sampler = DiffusionInferer(scheduler)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, N * C_out, *S)`` sampled 0/1 masks (class docstring)."""
        plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if plain.ndim == self.spatial_dims + 2:
            samples = self.sample(plain, network)
        elif self.spatial_dims == 2 and plain.ndim == 5:
            axis = 2 + (self.slice_axis % 3)
            batch, depth = plain.shape[0], plain.shape[axis]
            slices = plain.movedim(axis, 1).reshape(batch * depth, plain.shape[1], *plain.movedim(axis, 1).shape[3:])
            sampled = self.sample(slices, network)
            samples = sampled.reshape(batch, depth, *sampled.shape[1:]).movedim(1, axis)
        else:
            raise ValueError(
                f"inputs must be (B, C, {self.spatial_dims} spatial dims)"
                + (" or volumes (B, C, H, W, D) for slice-wise sampling" if self.spatial_dims == 2 else "")
                + f", got {tuple(inputs.shape)}."
            )
        return convert_to_dst_type(samples, inputs)[0]

    @torch.no_grad()
    def sample(self, images: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """``N`` sampled masks per image: ``(M, C_in, *s) -> (M, N * C_out, *s)``, 0/1 in the images' dtype."""
        count, spatial = images.shape[0], tuple(images.shape[2:])
        images = images.float()
        out = torch.zeros(count, self.num_ensemble, self.out_channels, *spatial, device=images.device)
        if self.skip_empty:
            todo = torch.nonzero(images.flatten(1).abs().amax(dim=1) > 0).flatten()
        else:
            todo = torch.arange(count, device=images.device)
        # every (image, ensemble member) pair, image-major, processed batch_size pairs at a time
        image_index = todo.repeat_interleave(self.num_ensemble)
        member_index = torch.arange(self.num_ensemble, device=images.device).repeat(todo.numel())
        self.scheduler.set_timesteps(self.num_inference_steps)
        for start in range(0, image_index.numel(), self.batch_size):
            idx, members = image_index[start : start + self.batch_size], member_index[start : start + self.batch_size]
            condition = images[idx]
            noise = torch.randn(idx.numel(), self.out_channels, *spatial, device=images.device)
            x_0 = self._sampler.sample(
                input_noise=noise,
                diffusion_model=network,
                scheduler=self.scheduler,
                conditioning=condition,
                mode="crossattn",
                verbose=self.progress,
            )
            out[idx, members] = signal_to_mask(x_0.float(), self.threshold)
        if self.zero_outside:
            out = out * (images.abs().amax(dim=1) > 0)[:, None, None].to(out.dtype)
        return out.reshape(count, self.num_ensemble * self.out_channels, *spatial).to(images.dtype)
