"""Diffusion segmentation with MONAI engines: training batches, the training forward and whole-volume ensemble sampling.

MedSegDiff (Wu et al., "MedSegDiff: Medical Image Segmentation with Diffusion Probabilistic Model", MIDL 2023,
arXiv 2211.00611) treats a segmentation mask as the sample of a conditional diffusion model: the mask, scaled to
``[-1, 1]``, is noised as ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and a network ``eps_theta(x_t, I, t)``
predicts ``eps`` given the image ``I``. MONAI provides the pieces this module composes:

- the schedulers (``monai.networks.schedulers.DDPMScheduler`` for training, DDPM or ``DDIMScheduler`` for
  sampling) own the diffusion maths;
- ``monai.inferers.DiffusionInferer`` runs the training forward (noise the input, call the network);
- ``monai.engines.utils.DiffusionPrepareBatch`` draws the noise and timesteps of a training batch.

What MONAI's versions do not cover, hence the classes here:

- :class:`SegmentationDiffusionPrepareBatch`: ``DiffusionPrepareBatch`` noises the batch's *image* and conditions
  on another key; here the *label* (the mask, mapped to ``[-1, 1]``) is noised and the image is the condition,
  and the target carries ``x_0`` next to ``eps`` for the optional auxiliary loss on the predicted ``x_0``.
- :class:`DiffusionSegmentationTrainingInferer`: ``DiffusionInferer.__call__`` returns ``eps_hat`` only; this one
  also returns ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` (the quantity of the auxiliary loss,
  :class:`~common.losses.diffusion_segmentation.DiffusionSegmentationLoss`), which needs the timesteps that only
  the inferer sees.
- :class:`DiffusionSegmentationInferer`: ``DiffusionInferer.sample`` runs one reverse chain on one batch, calling the
  network on the whole batch at every step; segmenting a 3D volume with a 2D model needs the volume cut into
  slices, an ensemble of ``num_ensemble`` samples per slice (fused afterwards by
  :class:`~common.data.ensemble_fusion.FuseEnsembled`), all of them in one chain with network calls of a size that
  suits the device, noise that does not depend on how the pairs are batched, the samples thresholded back to masks,
  and slices outside the body skipped.

For DDIM sampling of masks use :class:`~common.networks.clipped_ddim.ClippedDDIMScheduler` (see there why MONAI's
``DDIMScheduler`` step drifts on clipped samples); :class:`~common.networks.dpm_solver.DPMSolverMultistepScheduler`
is DPM-Solver++(2M) on the same grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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
    """Sample an ensemble of segmentations of each image; a whole volume's slices and members in one reverse chain.

    ``__call__(inputs, network)``:

    - 2D model (``spatial_dims=2``) on volumes ``(B, C_in, H, W, D)``: the volume is cut into slices along
      ``slice_axis`` (default the last, axial after ``Orientationd("RAS")``), every (slice, ensemble member) pair of
      the batch is sampled together and the masks are stacked back: ``-> (B, N * C_out, H, W, D)``;
    - inputs with ``spatial_dims`` spatial axes (2D slices, or volumes for a 3D model): ``(B, C_in, *S) ->
      (B, N * C_out, *S)``.

    The reverse chain runs once for all pairs: for each timestep of ``scheduler`` (``num_inference_steps``), the
    network predicts the noise of every pair in calls of ``batch_size`` pairs (the image as ``context``), then one
    ``scheduler.step`` moves all pairs to the next timestep. The network only predicts; the scheduler owns the maths,
    so DDPM, DDIM and DPM-Solver++ are a config change. Compared with one chain per slice (``DiffusionInferer.sample``
    per batch), nothing is computed twice and ``batch_size`` only sets the size of a network call: on a CPU, a
    small call (a few 256 x 256 slices) is faster per slice than a large one, whose activations do not fit the
    caches; on a GPU, a large one.

    Each pair starts from its own Gaussian noise, drawn from a generator seeded by ``(seed, key, member)``, where
    ``key`` identifies the image (``(b, z)``, batch item and slice index, for a sliced volume; ``(b,)`` otherwise):
    so a slice gets the same noise, and with a deterministic sampler (DDIM with ``eta=0``, DPM-Solver++) the same
    mask, whatever ``batch_size`` and whether it is sampled alone or with its volume. A stochastic step (DDPM) draws
    its noise for all pairs at once from a generator seeded by ``seed``, reproducible for the same inputs.

    The final ``x_0`` in ``[-1, 1]`` is thresholded at ``threshold`` (default 0) into a 0/1 mask. Channels are
    sample-major: channel ``n * C_out + c`` is sample ``n`` of mask channel ``c``; fuse them with
    :class:`~common.data.ensemble_fusion.FuseEnsembled`. Images that are 0 everywhere (slices outside the
    skull-stripped brain) are not sampled and get an empty mask when ``skip_empty`` is true (default): a large
    saving on brain MRI, where a sixth to a third of the axial slices are empty. With ``zero_outside`` (default)
    voxels whose image is 0 in every channel (background of a skull-stripped scan) are set to background in every
    sample. The result has the type and metadata of ``inputs`` (a ``MetaTensor`` stays one, so ``Invertd`` can map it
    back to the input grid).

    Samplers: :class:`~common.networks.clipped_ddim.ClippedDDIMScheduler` (the bundle's DDIM: the noise re-derived
    from the clipped ``x_0``, as guided-diffusion samples masks), MONAI's ``DDIMScheduler`` or
    :class:`~common.networks.dpm_solver.DPMSolverMultistepScheduler` (DPM-Solver++(2M)), with any
    ``num_inference_steps``; ``DDPMScheduler`` only with ``num_inference_steps == num_train_timesteps``, because
    MONAI's ``DDPMScheduler.step`` always steps from ``t`` to ``t - 1`` (its posterior coefficients assume unit
    strides), so a strided DDPM chain would be wrong.

    Args:
        scheduler: sampling scheduler (same noise schedule as training).
        num_inference_steps: steps of the reverse chain.
        num_ensemble: samples per image ``N`` (MedSegDiff uses 5).
        out_channels: mask channels ``C_out`` of the network (1 for whole tumour, 3 for TC/WT/ET).
        spatial_dims: spatial dimensions of the network, 2 (slice-wise on volumes) or 3.
        slice_axis: spatial axis (0, 1, 2, or -1 for the last) along which a volume is sliced for a 2D network.
        batch_size: (image, member) pairs per network call.
        skip_empty: give all-zero images an empty mask without sampling.
        zero_outside: set voxels whose image is 0 in every channel to background.
        threshold: foreground where the sampled ``x_0`` exceeds this.
        seed: seed of the initial noise of every pair and of the step noise of stochastic samplers.
        progress: show a progress bar over the timesteps.
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
        seed: int = 0,
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
        self.seed = int(seed)
        self.progress = progress

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, N * C_out, *S)`` sampled 0/1 masks (class docstring)."""
        plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if plain.ndim == self.spatial_dims + 2:
            samples = self.sample(plain, network)
        elif self.spatial_dims == 2 and plain.ndim == 5:
            axis = 2 + (self.slice_axis % 3)
            batch, depth = plain.shape[0], plain.shape[axis]
            moved = plain.movedim(axis, 1)  # (B, D, C, H', W')
            slices = moved.reshape(batch * depth, *moved.shape[2:])
            keys = [(b, z) for b in range(batch) for z in range(depth)]
            sampled = self.sample(slices, network, keys)
            samples = sampled.reshape(batch, depth, *sampled.shape[1:]).movedim(1, axis)
        else:
            raise ValueError(
                f"inputs must be (B, C, {self.spatial_dims} spatial dims)"
                + (" or volumes (B, C, H, W, D) for slice-wise sampling" if self.spatial_dims == 2 else "")
                + f", got {tuple(inputs.shape)}."
            )
        return convert_to_dst_type(samples, inputs)[0]

    def initial_noise(
        self, keys: Sequence[tuple[int, ...]], shape: Sequence[int], device: torch.device
    ) -> torch.Tensor:
        """Noise ``(len(keys) * N, *shape)`` of every (image, member) pair, image-major, each from its own seed."""
        noise = torch.empty(len(keys) * self.num_ensemble, *shape, device=device)
        generator = torch.Generator(device=device)
        for i, key in enumerate(keys):
            for member in range(self.num_ensemble):
                seed = np.random.SeedSequence([self.seed, *key, member]).generate_state(1)[0]
                generator.manual_seed(int(seed))
                noise[i * self.num_ensemble + member] = torch.randn(*shape, generator=generator, device=device)
        return noise

    @torch.no_grad()
    def sample(
        self, images: torch.Tensor, network: torch.nn.Module, keys: Sequence[tuple[int, ...]] | None = None
    ) -> torch.Tensor:
        """``N`` sampled masks per image: ``(M, C_in, *s) -> (M, N * C_out, *s)``, 0/1 in the images' dtype.

        ``keys``: one tuple of ints per image, naming its noise (default ``(m,)`` for image ``m``).
        """
        count, spatial = images.shape[0], tuple(images.shape[2:])
        keys = [(m,) for m in range(count)] if keys is None else [tuple(int(k) for k in key) for key in keys]
        if len(keys) != count:
            raise ValueError(f"keys must name each of the {count} images, got {len(keys)}.")
        images = images.float()
        out = torch.zeros(count, self.num_ensemble, self.out_channels, *spatial, device=images.device)
        if self.skip_empty:
            todo = torch.nonzero(images.flatten(1).abs().amax(dim=1) > 0).flatten()
        else:
            todo = torch.arange(count, device=images.device)
        if todo.numel():
            # every (image, ensemble member) pair, image-major
            image_index = todo.repeat_interleave(self.num_ensemble)
            x = self.initial_noise([keys[i] for i in todo.tolist()], (self.out_channels, *spatial), images.device)
            x = self.reverse_chain(x, images, image_index, network)
            out[todo] = signal_to_mask(x.float(), self.threshold).reshape(todo.numel(), self.num_ensemble, -1, *spatial)
        if self.zero_outside:
            out = out * (images.abs().amax(dim=1) > 0)[:, None, None].to(out.dtype)
        return out.reshape(count, self.num_ensemble * self.out_channels, *spatial).to(images.dtype)

    def reverse_chain(
        self, x: torch.Tensor, images: torch.Tensor, image_index: torch.Tensor, network: torch.nn.Module
    ) -> torch.Tensor:
        """Run the scheduler's chain on all pairs: ``x (P, C_out, *s)`` noise -> ``x_0 (P, C_out, *s)``.

        Pair ``p`` is conditioned on ``images[image_index[p]]``; the network sees ``batch_size`` pairs per call.
        """
        self.scheduler.set_timesteps(self.num_inference_steps, device=x.device)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        timesteps = self.scheduler.timesteps
        if self.progress:
            from tqdm import tqdm

            timesteps = tqdm(timesteps, desc="sampling")
        eps = torch.empty_like(x)
        for t in timesteps:
            for start in range(0, x.shape[0], self.batch_size):
                chunk = slice(start, start + self.batch_size)
                batch_t = torch.full((x[chunk].shape[0],), int(t), device=x.device, dtype=torch.long)
                eps[chunk] = network(x[chunk], timesteps=batch_t, context=images[image_index[chunk]])
            x, _ = self.scheduler.step(eps, int(t), x, generator=generator)
        return x
