"""Stage 2: train a diffusion UNet on autoencoder latents, and score it on held-out latents."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Evaluator
from monai.inferers import DiffusionInferer
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from scripts.diffusion import diffusion_target, sample_timesteps
from scripts.engines.base import (
    GenerativeTrainer,
    OptimizerStep,
    amp_dtype_of,
    autocast_context,
)
from scripts.latents import PrepareLatents

__all__ = ["LatentDiffusionEvaluator", "LatentDiffusionTrainer", "diffusion_loss", "lower_is_better"]


def _noised_loss(engine: Any, network: nn.Module, z_mu: torch.Tensor, z_sigma: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion loss of one batch: sample ``z ~ N(mu, sigma^2)``, scale, noise at random timesteps, predict."""
    def randn(like: torch.Tensor) -> torch.Tensor:
        if generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=generator).to(like.device)

    latents = (z_mu + z_sigma * randn(z_mu)) * engine.scale_factor
    noise = randn(latents)
    timesteps = sample_timesteps(engine.noise_scheduler, latents, generator)
    with engine.autocast():
        prediction = engine.inferer(inputs=latents, diffusion_model=network, noise=noise, timesteps=timesteps)
    target = diffusion_target(engine.noise_scheduler, latents, noise, timesteps)
    return engine.loss_function(prediction.float(), target.float())


class LatentDiffusionTrainer(GenerativeTrainer):
    """Denoising training in latent space (Rombach et al. 2022) with any MONAI noise scheduler.

    Each iteration: ``(z_mu, z_sigma) = prepare_batch(batch)`` (cached or freshly encoded posterior),
    ``z = (z_mu + z_sigma * eps) * scale_factor``, noise at sampled timesteps through ``inferer``
    (MONAI's ``DiffusionInferer`` on latents), MSE against the scheduler's target (noise, velocity, sample, or the
    rectified-flow velocity).

    Args:
        network: the diffusion UNet (latent space in and out).
        optimizer: its optimiser.
        noise_scheduler: MONAI ``DDPMScheduler`` or ``RFlowScheduler`` (its ``prediction_type`` sets the target).
        scale_factor: multiplies latents to unit variance (see :func:`scripts.latents.estimate_scale_factor`).
        loss_function: default ``MSELoss``.
        inferer: default ``DiffusionInferer(noise_scheduler)``.
        prepare_batch: default ``PrepareLatents()`` (batches of cached posteriors).
        other arguments: see :class:`scripts.engines.base.GenerativeTrainer`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        noise_scheduler: nn.Module,
        scale_factor: float,
        loss_function: Callable | None = None,
        inferer: DiffusionInferer | None = None,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         prepare_batch=PrepareLatents() if prepare_batch is None else prepare_batch,
                         inferer=inferer or DiffusionInferer(noise_scheduler),
                         train_handlers=train_handlers, stage=kwargs.pop("stage", "stage-2"), **kwargs)
        self.network = network
        self.noise_scheduler = noise_scheduler
        self.scale_factor = float(scale_factor)
        self.loss_function = loss_function or nn.MSELoss()
        self.step = self.make_step(network, optimizer)

    def optimizer_steps(self) -> dict[str, OptimizerStep]:
        return {"step": self.step}

    def _iteration(self, engine: LatentDiffusionTrainer, batchdata: dict) -> dict:
        z_mu, z_sigma = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.train()
        loss = _noised_loss(engine, engine.network, z_mu, z_sigma)
        engine.check_finite({"diffusion": loss})
        step_now = engine.is_step_iteration()
        engine.step.backward(loss, sync=step_now)
        if step_now:
            engine.step.step()
        value = float(loss.detach())
        return {CommonKeys.LOSS: loss.detach(), "losses": {"diffusion": value}}


class LatentDiffusionEvaluator(Evaluator):
    """Validation loss on held-out latents with fixed noise, latent draws and timesteps (seeded per iteration), so
    that rounds compare. ``engine.state.output["loss"]`` is the batch loss; pair with an ``Average`` metric.

    Args:
        network: the network to score (usually the EMA weights).
        noise_scheduler, scale_factor, inferer: as for :class:`LatentDiffusionTrainer`.
        seed: base seed of the fixed randomness.
        other arguments: see ``monai.engines.Evaluator``.
    """

    def __init__(self, device: str | torch.device, val_data_loader: Iterable, network: nn.Module,
                 noise_scheduler: nn.Module, scale_factor: float, inferer: DiffusionInferer | None = None,
                 prepare_batch: Callable | None = None, seed: int = 0, amp: bool = False,
                 amp_dtype: str = "bfloat16", loss_function: Callable | None = None, **kwargs: Any) -> None:
        prepare_batch = PrepareLatents() if prepare_batch is None else prepare_batch
        super().__init__(device=device, val_data_loader=val_data_loader, prepare_batch=prepare_batch,
                         decollate=False, **kwargs)
        self.network = network
        self.noise_scheduler = noise_scheduler
        self.scale_factor = float(scale_factor)
        self.inferer = inferer or DiffusionInferer(noise_scheduler)
        self.loss_function = loss_function or nn.MSELoss()
        self.seed = seed
        self.use_amp = amp
        self.amp_dtype = amp_dtype_of(amp_dtype)

    def autocast(self):  # same contract as GenerativeTrainer.autocast
        return autocast_context(self.state.device, self.use_amp, self.amp_dtype)

    def _iteration(self, engine: LatentDiffusionEvaluator, batchdata: dict) -> dict:
        z_mu, z_sigma = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.eval()
        generator = torch.Generator().manual_seed(engine.seed * 7919 + engine.state.iteration)
        with torch.no_grad():
            loss = _noised_loss(engine, engine.network, z_mu, z_sigma, generator)
        return {CommonKeys.LOSS: loss}


def diffusion_loss(output: dict) -> torch.Tensor:
    """Output transform for metrics: the batch loss of an iteration's output."""
    return output[CommonKeys.LOSS]


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for losses."""
    return current < best
