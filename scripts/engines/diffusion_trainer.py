"""Stage 2: train a diffusion UNet on autoencoder latents, and score it on held-out latents."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.inferers import DiffusionInferer
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from scripts.diffusion import LatentDiffusionPrepareBatch
from scripts.engines.base import (
    GenerativeTrainer,
    OptimizerStep,
    amp_dtype_of,
    autocast_context,
)

__all__ = [
    "LatentDiffusionEvaluator", "LatentDiffusionTrainer", "diffusion_loss", "diffusion_step_loss", "lower_is_better",
]


def diffusion_step_loss(engine: Any, network: nn.Module, batchdata: dict,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion loss of one batch: ``engine.prepare_batch`` (a :class:`LatentDiffusionPrepareBatch`) gives the
    scaled latents, target and the inferer's ``noise``/``timesteps``/``condition``; the inferer noises and predicts."""
    extra = {} if generator is None else {"generator": generator}
    inputs, target, args, kwargs = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                                        **extra, **engine.to_kwargs)
    with engine.autocast():
        prediction = engine.inferer(inputs, network, *args, **kwargs)
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    loss = engine.loss_function(prediction.float(), target.float())
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    return loss


class LatentDiffusionTrainer(GenerativeTrainer):
    """Denoising training in latent space (Rombach et al. 2022) with any MONAI noise scheduler.

    Each iteration: ``prepare_batch`` (a :class:`scripts.diffusion.LatentDiffusionPrepareBatch`) samples the
    latent ``z = (z_mu + z_sigma * eps) * scale_factor`` of the (cached or freshly encoded) posterior, the noise,
    the timesteps, the target and the optional condition; ``inferer`` (MONAI's ``DiffusionInferer`` on latents)
    noises and predicts; MSE against the target. Fires MONAI's ``IterationEvents``: ``FORWARD_COMPLETED``,
    ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, and ``MODEL_COMPLETED`` after each optimiser step (EMA updates
    attach there).

    Args:
        network: the diffusion UNet (latent space in and out).
        optimizer: its optimiser.
        prepare_batch: the objective, :class:`scripts.diffusion.LatentDiffusionPrepareBatch` (scheduler, scale
            factor, latents, condition).
        loss_function: default ``MSELoss``.
        inferer: default ``DiffusionInferer`` with the objective's scheduler.
        other arguments: see :class:`scripts.engines.base.GenerativeTrainer`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        prepare_batch: LatentDiffusionPrepareBatch,
        loss_function: Callable | None = None,
        inferer: DiffusionInferer | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         prepare_batch=prepare_batch,
                         inferer=inferer or DiffusionInferer(prepare_batch.noise_scheduler),
                         train_handlers=train_handlers, stage=kwargs.pop("stage", "stage-2"), **kwargs)
        self.network = network
        self.loss_function = loss_function or nn.MSELoss()
        self.step = self.make_step(network, optimizer)

    def optimizer_steps(self) -> dict[str, OptimizerStep]:
        return {"step": self.step}

    def _iteration(self, engine: LatentDiffusionTrainer, batchdata: dict) -> dict:
        engine.network.train()
        loss = diffusion_step_loss(engine, engine.network, batchdata)
        engine.check_finite({"diffusion": loss})
        step_now = engine.is_step_iteration()
        engine.step.backward(loss, sync=step_now)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step_now:
            engine.step.step()
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
        value = float(loss.detach())
        return {CommonKeys.LOSS: loss.detach(), "losses": {"diffusion": value}}


class LatentDiffusionEvaluator(Evaluator):
    """Validation loss on held-out latents with fixed noise, latent draws and timesteps (seeded per iteration), so
    that rounds compare. ``engine.state.output["loss"]`` is the batch loss; pair with an ``Average`` metric.

    Args:
        network: the network to score (usually the EMA weights).
        prepare_batch: the objective, shared with the trainer (:class:`scripts.diffusion.LatentDiffusionPrepareBatch`).
        inferer: default ``DiffusionInferer`` with the objective's scheduler.
        seed: base seed of the fixed randomness.
        other arguments: see ``monai.engines.Evaluator``.
    """

    def __init__(self, device: str | torch.device, val_data_loader: Iterable, network: nn.Module,
                 prepare_batch: LatentDiffusionPrepareBatch, inferer: DiffusionInferer | None = None,
                 seed: int = 0, amp: bool = False, amp_dtype: str = "bfloat16", loss_function: Callable | None = None,
                 **kwargs: Any) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, prepare_batch=prepare_batch,
                         decollate=False, **kwargs)
        self.network = network
        self.inferer = inferer or DiffusionInferer(prepare_batch.noise_scheduler)
        self.loss_function = loss_function or nn.MSELoss()
        self.seed = seed
        self.use_amp = amp
        self.amp_dtype = amp_dtype_of(amp_dtype)

    def autocast(self):  # same contract as GenerativeTrainer.autocast
        return autocast_context(self.state.device, self.use_amp, self.amp_dtype)

    def _iteration(self, engine: LatentDiffusionEvaluator, batchdata: dict) -> dict:
        engine.network.eval()
        generator = torch.Generator().manual_seed(engine.seed * 7919 + engine.state.iteration)
        with torch.no_grad():
            loss = diffusion_step_loss(engine, engine.network, batchdata, generator)
        return {CommonKeys.LOSS: loss}


def diffusion_loss(output: dict) -> torch.Tensor:
    """Output transform for metrics: the batch loss of an iteration's output."""
    return output[CommonKeys.LOSS]


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for losses."""
    return current < best
