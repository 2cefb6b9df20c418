"""Stage 1: the VAE-GAN trainer for MONAI's ``AutoencoderKL`` (or ``VQVAE``) and ``PatchDiscriminator``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from scripts.autoencoders import adapt
from scripts.data import PrepareImage, image_from_batch
from scripts.distributed import unwrap
from scripts.engines.base import GenerativeTrainer, OptimizerStep
from scripts.losses import AutoencoderLoss

__all__ = ["AutoencoderTrainer"]


class AutoencoderTrainer(GenerativeTrainer):
    """One generator step, then ``d_train_steps`` discriminator steps, per iteration.

    The network is driven through its :func:`scripts.autoencoders.adapt` adapter, so ``AutoencoderKL`` (KL term) and
    ``VQVAE`` (quantisation term) train with the same code. The adversarial terms start after
    ``adversarial_warmup_epochs`` epochs of reconstruction + latent-regulariser training.
    ``engine.state.output`` holds ``image``, ``pred`` (the reconstruction), ``loss`` (generator loss) and
    ``losses`` (every term as a float, for logging).

    Args:
        g_network: the autoencoder, ``AutoencoderKL`` or ``VQVAE``.
        g_optimizer: its optimiser.
        d_network: the patch discriminator; ``None`` trains without adversarial loss.
        d_optimizer: its optimiser.
        loss_function: an :class:`AutoencoderLoss` holding every term and weight.
        d_train_steps: discriminator updates per generator update (the reference recipe uses 5).
        adversarial_warmup_epochs: epochs before the adversarial terms switch on.
        other arguments: see :class:`scripts.engines.base.GenerativeTrainer`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        g_network: nn.Module,
        g_optimizer: Optimizer,
        loss_function: AutoencoderLoss,
        d_network: nn.Module | None = None,
        d_optimizer: Optimizer | None = None,
        d_train_steps: int = 1,
        adversarial_warmup_epochs: int = 0,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            prepare_batch=prepare_batch or PrepareImage(),
            train_handlers=train_handlers,
            stage=kwargs.pop("stage", "stage-1"),
            **kwargs,
        )
        if (d_network is None) != (d_optimizer is None):
            raise ValueError("give both d_network and d_optimizer, or neither.")
        self.g_network = g_network
        self.g_adapter = adapt(g_network)
        self.d_network = d_network
        self.loss_function = loss_function
        self.d_train_steps = int(d_train_steps)
        self.adversarial_warmup_epochs = int(adversarial_warmup_epochs)
        self.g_step = self.make_step(g_network, g_optimizer)
        self.d_step = self.make_step(d_network, d_optimizer) if d_network is not None else None

    def optimizer_steps(self) -> dict[str, OptimizerStep]:
        steps = {"g_step": self.g_step}
        if self.d_step is not None:
            steps["d_step"] = self.d_step
        return steps

    def adversarial_active(self) -> bool:
        """Whether the adversarial terms are on in the current epoch."""
        return self.d_network is not None and self.state.epoch > self.adversarial_warmup_epochs

    def frozen_discriminator_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Last-layer discriminator logits of ``images`` for the generator's adversarial term.

        Gradients flow to ``images`` only, never into the discriminator's weights (only the discriminator step
        updates them), and a DDP wrapper is bypassed, so no gradient all-reduce is started for this pass.
        """
        discriminator = unwrap(self.d_network)
        flags = [p.requires_grad for p in discriminator.parameters()]
        discriminator.requires_grad_(False)
        try:
            return discriminator(images)[-1]
        finally:
            for p, flag in zip(discriminator.parameters(), flags, strict=True):
                p.requires_grad_(flag)

    def _iteration(self, engine: AutoencoderTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        images = image_from_batch(
            engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        )
        adversarial = engine.adversarial_active()
        step_now = engine.is_step_iteration()

        engine.g_network.train()
        with engine.autocast():
            recon, regularisers = engine.inferer(images, engine.g_adapter)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            fake_logits = engine.frozen_discriminator_logits(recon.float()) if adversarial else None
            terms = engine.loss_function.generator_terms(recon.float(), images, regularisers, fake_logits)
        g_loss = torch.stack([t.float() for t in terms.values()]).sum()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.check_finite({**terms, "generator": g_loss})
        engine.g_step.backward(g_loss, sync=step_now)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step_now:
            engine.g_step.step()

        losses = {k: float(v.detach()) for k, v in terms.items()}
        losses["g_loss"] = float(g_loss.detach())
        if adversarial:
            fake = recon.detach().float().contiguous()
            for _ in range(engine.d_train_steps):
                engine.d_network.train()
                with engine.autocast():
                    d_loss = engine.loss_function.discriminator_loss(
                        engine.d_network(images.contiguous())[-1], engine.d_network(fake)[-1]
                    )
                engine.check_finite({"discriminator": d_loss})
                engine.d_step.backward(d_loss, sync=step_now)
                if step_now:
                    engine.d_step.step()
            losses["d_loss"] = float(d_loss.detach())
        if step_now:
            engine.fire_event(IterationEvents.MODEL_COMPLETED)

        return {CommonKeys.IMAGE: images, CommonKeys.PRED: recon.detach(), CommonKeys.LOSS: g_loss.detach(),
                "losses": losses}
