"""The training objective of stage 2, scheduler-agnostic: timesteps, targets, and MONAI's ``DiffusionPrepareBatch``.

Schedulers are MONAI's (``DDPMScheduler``, ``RFlowScheduler``; the sampling variants in :mod:`scripts.schedulers`).
Sampling is :mod:`scripts.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from scripts.latents import PrepareLatents
from scripts.randomness import SAMPLE_INDEX, keyed_generators

if TYPE_CHECKING:
    from scripts.conditioning import Conditions

__all__ = ["LatentDiffusionPrepareBatch", "batch_condition", "diffusion_target", "sample_timesteps"]


def sample_timesteps(scheduler: nn.Module, latents: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps, one per batch item: uniform integers for DDPM-family schedulers, the scheduler's own
    (e.g. logit-normal) distribution for rectified flow."""
    if isinstance(scheduler, RFlowScheduler):
        if generator is None:
            return scheduler.sample_timesteps(latents)
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        try:
            return scheduler.sample_timesteps(latents)
        finally:
            torch.random.set_rng_state(state)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), generator=generator)
    return timesteps.long().to(latents.device)


def diffusion_target(scheduler: nn.Module, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict: the noise (``epsilon``), the velocity (``v_prediction``, Salimans & Ho
    2022), the clean latent (``sample``), or for rectified flow (Liu et al. 2022) the velocity ``x0 - noise``."""
    if isinstance(scheduler, RFlowScheduler):
        return latents - noise
    prediction_type = getattr(scheduler, "prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got '{prediction_type}'.")


def batch_condition(batchdata: Mapping[str, Any], condition_name: str | Sequence[str],
                    device: str | torch.device | None = None, non_blocking: bool = False) -> torch.Tensor:
    """The condition of a batch: the tensor under ``condition_name``, or for a list of datalist fields (e.g.
    covariates carried through the latent cache) their values stacked as float features ``(B, len(names))``."""
    names = [condition_name] if isinstance(condition_name, str) else list(condition_name)
    missing = [n for n in names if n not in batchdata]
    if missing:
        raise KeyError(f"condition_name names {missing}, which the stage-2 batch does not carry (it has "
                       f"{sorted(batchdata)}); add the field to every datalist item or fix condition_name.")
    if isinstance(condition_name, str):
        value = torch.as_tensor(batchdata[condition_name])
    else:
        value = torch.stack([torch.as_tensor(batchdata[n]).float().reshape(-1) for n in names], dim=1)
    return value.to(device=device, non_blocking=non_blocking)


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """The stage-2 objective as MONAI's ``DiffusionPrepareBatch``, shared by the trainer and the validator.

    From a batch (cached posteriors or images, through ``latents``): ``z = (z_mu + z_sigma * eps) * scale_factor``,
    noise, timesteps from the scheduler's training distribution (:func:`sample_timesteps`) and the target of its
    prediction type (:func:`diffusion_target`). Returns MONAI's ``(inputs, target, args, kwargs)`` with ``kwargs``
    ``{"noise", "timesteps"}`` plus ``"condition"`` when ``condition_name`` is set: the one slot through which a
    condition reaches ``DiffusionInferer(inputs, network, noise=..., timesteps=..., condition=...)`` (cross-attention
    context or concatenated channels, by the inferer's ``mode``).

    Args:
        noise_scheduler: the training scheduler (MONAI ``DDPMScheduler`` or ``RFlowScheduler``).
        scale_factor: multiplies latents to unit variance.
        latents: ``(batchdata, device, non_blocking) -> (z_mu, z_sigma)``; default :class:`PrepareLatents`.
        condition_name: batch key of the condition tensor, or a list of datalist fields stacked as features
            (:func:`batch_condition`); ``None``: unconditional.
        conditions: the declared conditions (:class:`scripts.conditioning.Conditions`): the batch's ``condition``
            holds their raw rows ``(B, width)`` and each condition is dropped to its null independently with its
            ``drop_prob`` (:meth:`~scripts.conditioning.Conditions.drop`), the classifier-free guidance training.
        sample_seed: key every draw of a training item (posterior sample, noise, timestep, condition dropout) by
            ``(sample_seed, epoch, the item's index in its data set)`` (:func:`scripts.randomness.keyed_generators`;
            the batch carries ``sample_index``, the epoch comes from :meth:`set_epoch`), so a run does not depend on
            how its items are spread over batches, processes or accumulated steps; ``None``: the global RNG.

    Calling it with ``generator=`` draws latents, noise and timesteps from that generator (the validator's fixed
    randomness); otherwise per item from its keyed generator (``sample_seed``) or from the global RNG. Subclasses add
    inputs in :meth:`extra_inputs`, which draws through :meth:`_draw` from the same streams.
    """

    def __init__(self, noise_scheduler: nn.Module, scale_factor: float, latents: Callable | None = None,
                 condition_name: str | Sequence[str] | None = None, conditions: Conditions | None = None,
                 sample_seed: int | None = None) -> None:
        if conditions is not None and condition_name is None:
            condition_name = "condition"
        super().__init__(num_train_timesteps=int(noise_scheduler.num_train_timesteps),
                         condition_name=condition_name or None)
        self.conditions = conditions
        self.noise_scheduler = noise_scheduler
        self.scale_factor = float(scale_factor)
        self.latents = PrepareLatents() if latents is None else latents
        self.sample_seed = None if sample_seed is None else int(sample_seed)
        self.epoch = 0
        self._generator: torch.Generator | None = None
        self._items: list[torch.Generator] | None = None  # the batch's keyed generators, one per item

    def set_epoch(self, epoch: int) -> None:
        """The training epoch that keys this epoch's draws (``sample_seed``); set by
        :class:`scripts.handlers.SetEpoch` when each epoch starts, resumed epochs included."""
        self.epoch = int(epoch)

    def _draw(self, draw: Callable[[slice, torch.Generator | None], torch.Tensor], n: int) -> torch.Tensor:
        """``draw(rows, generator)`` for the batch's ``n`` items: at once from the call's generator (or the global RNG
        when it is ``None``), or item by item from each item's keyed generator."""
        if self._items is None:
            return draw(slice(0, n), self._generator)
        return torch.cat([draw(slice(i, i + 1), g) for i, g in enumerate(self._items)])

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        def draw(rows: slice, generator: torch.Generator | None) -> torch.Tensor:
            if generator is None:
                return torch.randn_like(like[rows])
            return torch.randn(like[rows].shape, generator=generator).to(like.device)

        return self._draw(draw, like.shape[0])

    def _rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform draws of ``shape`` on the CPU (first dimension: the batch items)."""
        return self._draw(lambda rows, g: torch.rand((rows.stop - rows.start, *shape[1:]), generator=g), shape[0])

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return self._randn(images)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return self._draw(lambda rows, g: sample_timesteps(self.noise_scheduler, images[rows], g), images.shape[0])

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.noise_scheduler, images, noise, timesteps)

    def extra_inputs(self, batchdata: dict, latents: torch.Tensor, infer_kwargs: dict,
                     non_blocking: bool = False) -> None:
        """Hook for subclasses: add inputs (e.g. a control) to ``infer_kwargs``, drawing through :meth:`_draw`."""

    def _keyed(self, batchdata: Mapping[str, Any], generator: torch.Generator | None) -> list[torch.Generator] | None:
        if generator is not None or self.sample_seed is None:
            return None
        if SAMPLE_INDEX not in batchdata:
            raise KeyError(f"sample_seed keys each item's draws by its '{SAMPLE_INDEX}', which this batch does not "
                           f"carry; build the data set with scripts.latents.stage2_dataset (or add the index to each "
                           f"item), or set the seed to null to draw from the global RNG.")
        return keyed_generators(self.sample_seed, self.epoch, batchdata[SAMPLE_INDEX])

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                 generator: torch.Generator | None = None, **kwargs: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        self._generator, self._items = generator, self._keyed(batchdata, generator)
        try:
            z_mu, z_sigma = self.latents(batchdata, device, non_blocking)
            latents = (z_mu + z_sigma * self._randn(z_mu)) * self.scale_factor
            noise = self.get_noise(latents)
            timesteps = self.get_timesteps(latents)
            target = self.get_target(latents, noise, timesteps)
            infer_kwargs = {"noise": noise, "timesteps": timesteps}
            if self.condition_name is not None:
                condition = batch_condition(batchdata, self.condition_name, latents.device, non_blocking)
                if self.conditions is not None:
                    rows = condition
                    condition = self._draw(lambda r, g: self.conditions.drop(rows[r], g), rows.shape[0])
                infer_kwargs["condition"] = condition
            self.extra_inputs(batchdata, latents, infer_kwargs, non_blocking)
        finally:
            self._generator, self._items = None, None
        return latents, target, (), infer_kwargs
