"""Training of the 3D inpainting GAN of the COVID-19 pipeline: adversarial plus denoising reconstruction.

Shabani et al., "Self-supervised region-aware segmentation of COVID-19 CT images using 3D GAN and contrastive
learning", Computers in Biology and Medicine 2022. One iteration, with ``x`` a batch of COVID-19 volumes (the
generator's inputs), ``h`` a batch of healthy volumes (CT-0) and ``m_x``, ``m_h`` their lung masks:

1. discriminator step: ``L_D = 1/2 [adv(D(h), real) + adv(D(G(x) m_x), fake)]``;
2. generator step: ``L_G = w_adv adv(D(G(x) m_x), real) + w_rec |G(n(h)) m_h - h|_1``, where ``n`` adds
   Perlin-like fractal noise to random axial slices of the lungs (:func:`common.networks.covid_gan.denoising_noise`).

Both losses are those of the paper's 3D GAN stage (Shabani et al. 2022, the pseudo-mask generation); its full
text was not available to this project, so no equation numbers are given (they would have to be guessed); the
formulas follow the project's method notes (``METHODS.md``, section 3), and the weights ``w_adv``, ``w_rec`` are
this implementation's (the paper does not weight the terms).

The adversarial term makes ``G(x)`` look healthy; the denoising term teaches ``G`` to remove lesion-like
blobs and to leave healthy parenchyma as it is, so that ``x - G(x)`` is the lesion (the pseudo-mask,
:func:`common.data.pseudo_masks.pseudo_mask`). Outputs are multiplied by the lung mask: outside the lungs
the preprocessed volumes are 0, and a generator left free there would hand the discriminator a trivial cue.

Why not MONAI's ``GanTrainer``: it feeds the generator random latents made without the batch
(``g_prepare_batch(num_latents, latent_size, ...)``), and its generator loss sees only ``G``'s output, so
neither the conditional input (a COVID-19 volume) nor a reconstruction target can be expressed. MONAI's
``AdversarialTrainer`` reconstructs its own input and uses that same input as the discriminator's reals,
while here the reals are other (healthy) studies and the reconstruction is of a corrupted healthy
volume. This trainer is a MONAI ``Trainer`` (an ignite engine), so MONAI's handlers (``StatsHandler``,
``CheckpointSaver``, ``TensorBoardStatsHandler``) attach to it as to any other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines import Trainer
from monai.inferers import Inferer, SimpleInferer
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common.networks.covid_gan import denoising_noise

__all__ = ["InpaintingGanTrainer"]


class InpaintingGanTrainer(Trainer):
    """Ignite trainer for :class:`common.networks.covid_gan.InpaintingGenerator` and its discriminator.

    An epoch is one pass over ``train_data_loader`` (the COVID-19 studies); ``healthy_data_loader`` is cycled
    alongside (re-shuffled each time it is exhausted), one healthy batch per iteration. Batches are dicts with
    ``(B, 1, D, H, W)`` volumes under ``image_key`` and lung masks under ``lung_key``, as
    :class:`common.data.chest_ct.LungPreprocessd` produces.

    ``engine.state.output`` of an iteration holds ``image`` (the COVID-19 batch), ``pred`` (``G(x) m_x``,
    detached), ``loss`` (``L_G``), ``g_loss``, ``d_loss``, ``adv_loss`` and ``recon_loss`` (floats).

    Args:
        device: device of the networks and batches.
        max_epochs: epochs to train.
        train_data_loader: COVID-19 volumes (the generator's inputs).
        healthy_data_loader: healthy volumes (the discriminator's reals and the denoising targets).
        g_network: the generator, ``(B, 1, D, H, W) -> (B, 1, D, H, W)``.
        g_optimizer: optimiser of the generator (the paper: Adam, lr 5e-5).
        d_network: the discriminator, volumes -> logits (any shape, e.g. patch logits).
        d_optimizer: optimiser of the discriminator (the paper: Adam, lr 1e-3).
        adversarial_loss: ``loss(logits, target_is_real, for_discriminator)``; default MONAI's
            ``PatchAdversarialLoss(criterion="bce")`` (sigmoid + binary cross-entropy).
        recon_loss_function: ``loss(G(n(h)) m_h, h)``. Default ``nn.L1Loss()``.
        adversarial_weight: ``w_adv``. Default 1.
        recon_weight: ``w_rec``. Default 10.
        noise_kwargs: keyword arguments of :func:`common.networks.covid_gan.denoising_noise` (``slice_fraction``,
            ``amplitude``, ``octaves``, ``base_resolution``, ``foreground_only``).
        noise_seed: seed of the corruption noise (its own ``torch.Generator``), ``None`` for the global RNG.
        g_inferer: how the generator is run on a batch (``g_inferer(x, g_network)``). Default MONAI's
            ``SimpleInferer`` (the whole volume at once).
        image_key: key of the volumes in the batches. Default ``"image"``.
        lung_key: key of the lung masks, or ``None`` not to mask the generator's outputs. Default ``"lung"``.
        channels_last: train in ``torch.channels_last_3d`` memory format (networks and batches): on CPU the
            backward pass of ``Conv3d`` is several times faster. Default True.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        non_blocking: non-blocking copies to the device.
        train_handlers: ignite / MONAI handlers to attach.
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        healthy_data_loader: Iterable | DataLoader,
        g_network: nn.Module,
        g_optimizer: Optimizer,
        d_network: nn.Module,
        d_optimizer: Optimizer,
        adversarial_loss: Callable[..., torch.Tensor] | None = None,
        recon_loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        adversarial_weight: float = 1.0,
        recon_weight: float = 10.0,
        noise_kwargs: dict[str, Any] | None = None,
        noise_seed: int | None = 0,
        g_inferer: Inferer | None = None,
        image_key: str = "image",
        lung_key: str | None = "lung",
        channels_last: bool = True,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = False,
    ) -> None:
        if adversarial_weight < 0 or recon_weight < 0 or adversarial_weight + recon_weight == 0:
            raise ValueError(
                f"adversarial_weight and recon_weight must be >= 0 and not both 0, got {adversarial_weight}, "
                f"{recon_weight}"
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=train_handlers,
            decollate=False,
        )
        self.healthy_data_loader = healthy_data_loader
        self.g_network = g_network
        self.g_optimizer = g_optimizer
        self.d_network = d_network
        self.d_optimizer = d_optimizer
        self.adversarial_loss = (
            adversarial_loss if adversarial_loss is not None else PatchAdversarialLoss(criterion="bce")
        )
        self.recon_loss_function = recon_loss_function if recon_loss_function is not None else nn.L1Loss()
        self.g_inferer = g_inferer if g_inferer is not None else SimpleInferer()
        self.adversarial_weight = float(adversarial_weight)
        self.recon_weight = float(recon_weight)
        self.noise_kwargs = dict(noise_kwargs or {})
        # fail now, not at the first iteration, on a bad noise argument (own generator: the global RNG is untouched)
        denoising_noise(torch.zeros(1, 1, 2, 4, 4), generator=torch.Generator().manual_seed(0), **self.noise_kwargs)
        self.noise_generator = None if noise_seed is None else torch.Generator().manual_seed(int(noise_seed))
        self.image_key = image_key
        self.lung_key = lung_key
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.optim_set_to_none = optim_set_to_none
        if channels_last:
            g_network.to(memory_format=self.memory_format)
            d_network.to(memory_format=self.memory_format)
        self._healthy_iter: Iterator | None = None
        self._healthy_epoch = 0

    def state_dict(self) -> OrderedDict:
        """The engine's state (epoch, iteration, ...) plus the corruption noise's generator state and the count of
        passes over the healthy loader, so a resumed run continues the noise sequence instead of replaying it
        (:class:`common.engines.checkpoint.ResumableCheckpoint` saves this)."""
        state = super().state_dict()
        state["healthy_epoch"] = self._healthy_epoch
        if self.noise_generator is not None:
            state["noise_generator"] = self.noise_generator.get_state()
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Inverse of :meth:`state_dict`; a plain ignite engine state (without the extra entries) loads too."""
        state_dict = dict(state_dict)
        healthy_epoch = state_dict.pop("healthy_epoch", None)
        noise_state = state_dict.pop("noise_generator", None)
        super().load_state_dict(state_dict)
        if healthy_epoch is not None:
            self._healthy_epoch = int(healthy_epoch)
            self._healthy_iter = None
        if noise_state is not None and self.noise_generator is not None:
            self.noise_generator.set_state(noise_state)

    def _next_healthy(self) -> dict[str, Any]:
        """The next healthy batch, restarting (and re-shuffling) the healthy loader when it is exhausted."""
        for _ in range(2):
            if self._healthy_iter is None:
                sampler = getattr(self.healthy_data_loader, "sampler", None)
                if isinstance(sampler, DistributedSampler):
                    sampler.set_epoch(self._healthy_epoch)
                self._healthy_epoch += 1
                self._healthy_iter = iter(self.healthy_data_loader)
            try:
                return next(self._healthy_iter)
            except StopIteration:
                self._healthy_iter = None
        raise ValueError("healthy_data_loader yields no batch: the training list has no healthy (CT-0) study")

    def _volumes(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        def to_device(x: Any) -> torch.Tensor:
            x = torch.as_tensor(x).to(self.state.device, non_blocking=self.non_blocking).float()
            return x.contiguous(memory_format=self.memory_format) if x.dim() == 5 else x

        image = to_device(batch[self.image_key])
        lung = None if self.lung_key is None else (to_device(batch[self.lung_key]) > 0).to(image.dtype)
        return image, lung

    def _iteration(self, engine: InpaintingGanTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        """One discriminator step and one generator step (see the module docstring)."""
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration")
        covid, covid_lung = engine._volumes(batchdata)
        healthy, healthy_lung = engine._volumes(engine._next_healthy())
        g, d = engine.g_network, engine.d_network
        g.train()
        d.train()

        def masked(x: torch.Tensor, lung: torch.Tensor | None) -> torch.Tensor:
            return x if lung is None else x * lung

        fake = masked(engine.g_inferer(covid, g), covid_lung)

        # discriminator: healthy studies are real, inpainted COVID-19 studies are fake
        d.requires_grad_(True)
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        d_loss = 0.5 * (
            engine.adversarial_loss(d(healthy), target_is_real=True, for_discriminator=True)
            + engine.adversarial_loss(d(fake.detach()), target_is_real=False, for_discriminator=True)
        )
        d_loss.backward()
        engine.d_optimizer.step()

        # generator: fool the (updated) discriminator and undo the denoising corruption of healthy studies
        d.requires_grad_(False)
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        adv_loss = engine.adversarial_loss(d(fake), target_is_real=True, for_discriminator=False)
        noisy = denoising_noise(healthy, generator=engine.noise_generator, **engine.noise_kwargs)
        recon = masked(engine.g_inferer(noisy.contiguous(memory_format=engine.memory_format), g), healthy_lung)
        recon_loss = engine.recon_loss_function(recon, healthy)
        g_loss = engine.adversarial_weight * adv_loss + engine.recon_weight * recon_loss
        g_loss.backward()
        engine.g_optimizer.step()
        d.requires_grad_(True)

        return {
            Keys.IMAGE: covid,
            Keys.PRED: fake.detach(),
            Keys.LOSS: g_loss.item(),
            "g_loss": g_loss.item(),
            "d_loss": d_loss.item(),
            "adv_loss": adv_loss.item(),
            "recon_loss": recon_loss.item(),
        }
