"""Noise schedulers: built by name from their config definitions, each reverse step landing on the timestep the
network is told.

``configs/common.json#schedulers`` holds one lazy definition per scheduler (``_mode_: callable``), so a workflow
builds only the scheduler it uses (:func:`make_scheduler`), after checking that it can take the prediction type.

The classes are MONAI's schedulers with their reverse step taken to the *previous timestep of the inference
schedule* that ``set_timesteps`` chose. MONAI's own steps assume a spacing of their own: ``DDPMScheduler.step`` goes
from ``t`` to ``t - 1`` (so DDPM in fewer steps than the training schedule ends near the noise it started from),
``DDIMScheduler.step`` to ``t - T // N`` (not the next of its ``linspace`` timesteps: a residual noise level is left
at the end when ``N`` does not divide ``T``), PNDM's PLMS warm-up skips a timestep (and its multi-step formula mixes
velocities of different timesteps), and ``RFlowScheduler.step`` truncates a continuous next timestep to an integer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    RFlowScheduler,
)
from monai.networks.schedulers.ddim import DDIMPredictionType
from monai.networks.schedulers.ddpm import DDPMPredictionType, DDPMVarianceType
from monai.networks.schedulers.pndm import PNDMPredictionType
from torch import nn

__all__ = [
    "ContinuousRFlowScheduler",
    "PLMSScheduler",
    "RespacedDDIMScheduler",
    "RespacedDDPMScheduler",
    "check_sampler",
    "default_sampler",
    "describe_scheduler",
    "make_scheduler",
    "predicted_original_and_noise",
]

#: the prediction types each MONAI scheduler family accepts (rectified flow has its own velocity target)
PREDICTION_TYPES: dict[type, tuple[str, ...]] = {
    DDPMScheduler: tuple(DDPMPredictionType.__members__.values()),
    DDIMScheduler: tuple(DDIMPredictionType.__members__.values()),
    PNDMScheduler: tuple(PNDMPredictionType.__members__.values()),
}


def previous_timestep(timesteps: torch.Tensor, timestep: int | torch.Tensor) -> int:
    """The timestep after ``timestep`` in a descending inference schedule, or ``-1`` after its last one.

    Raises:
        ValueError: ``timestep`` is not in the schedule (``set_timesteps`` was not called for it).
    """
    t = int(timestep)
    where = (timesteps.cpu() == t).nonzero()
    if len(where) == 0:
        raise ValueError(f"timestep {t} is not in the inference schedule {timesteps.tolist()[:8]}...; "
                         "call set_timesteps(num_inference_steps) before stepping.")
    i = int(where[-1]) + 1
    return int(timesteps[i]) if i < len(timesteps) else -1


def predicted_original_and_noise(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                                 alpha_prod_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, epsilon)`` implied by the network output at a sample ``x_t = sqrt(a) x0 + sqrt(1 - a) epsilon``.

    Args:
        prediction_type: ``epsilon``, ``sample`` (x0) or ``v_prediction`` (``sqrt(a) epsilon - sqrt(1 - a) x0``,
            Salimans & Ho 2022, https://arxiv.org/abs/2202.00512).
        model_output, sample: latent space, same shape.
        alpha_prod_t: the cumulative alpha ``a`` of the sample's timestep.
    """
    a, b = alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5
    if prediction_type == DDPMPredictionType.EPSILON:
        return (sample - b * model_output) / a, model_output
    if prediction_type == DDPMPredictionType.SAMPLE:
        return model_output, (sample - a * model_output) / b
    if prediction_type == DDPMPredictionType.V_PREDICTION:
        return a * sample - b * model_output, a * model_output + b * sample
    raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got '{prediction_type}'.")


class RespacedDDPMScheduler(DDPMScheduler):
    """DDPM ancestral sampling (Ho et al. 2020) on the timesteps ``set_timesteps`` chose, any number of them.

    Each step draws from the posterior ``q(x_s | x_t, x0)`` between consecutive inference timesteps ``t > s``, with
    the jump's ``beta = 1 - a_t / a_s`` ("respacing", Nichol & Dhariwal 2021, sec. 4, https://arxiv.org/abs/2102.09672).
    With all training timesteps it is MONAI's ``DDPMScheduler``; training (``add_noise``, ``get_velocity``) is
    unchanged.
    Arguments: those of ``monai.networks.schedulers.DDPMScheduler``.
    """

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_s, predicted x0)`` from ``x_t`` = ``sample`` and the network output at timestep ``t`` = ``timestep``."""
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        t = int(timestep)
        s = previous_timestep(self.timesteps, t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_s = self.alphas_cumprod[s] if s >= 0 else self.one
        beta_prod_t, beta_prod_s = 1 - alpha_prod_t, 1 - alpha_prod_s
        beta = 1 - alpha_prod_t / alpha_prod_s  # of the whole jump t -> s

        x0, _ = predicted_original_and_noise(self.prediction_type, model_output, sample, alpha_prod_t)
        if self.clip_sample:
            x0 = torch.clamp(x0, *self.clip_sample_values)
        # posterior mean, formula (7) of Ho et al. with the jump's alpha and beta
        mean = (alpha_prod_s**0.5 * beta / beta_prod_t) * x0 + ((1 - beta) ** 0.5 * beta_prod_s / beta_prod_t) * sample
        if s < 0:
            return mean, x0
        variance = beta_prod_s / beta_prod_t * beta
        if self.variance_type == DDPMVarianceType.FIXED_SMALL:
            variance = torch.clamp(variance, min=1e-20)
        elif self.variance_type == DDPMVarianceType.FIXED_LARGE:
            variance = beta
        elif self.variance_type == DDPMVarianceType.LEARNED and predicted_variance is not None:
            variance = predicted_variance
        elif self.variance_type == DDPMVarianceType.LEARNED_RANGE and predicted_variance is not None:
            frac = (predicted_variance + 1) / 2
            variance = frac * beta + (1 - frac) * variance
        noise = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                            device=model_output.device)
        return mean + variance**0.5 * noise, x0


class RespacedDDIMScheduler(DDIMScheduler):
    """DDIM (Song et al. 2021, https://arxiv.org/abs/2010.02502) stepping from each inference timestep to the next one.

    MONAI's ``DDIMScheduler`` places its timesteps with ``linspace(T - 1, 0, N)`` but steps to ``t - T // N``; here
    the step goes to the next timestep of the schedule, and after the last one (``t = 0``) to the clean sample
    (``final_alpha_cumprod``, 1 with ``set_alpha_to_one``). Arguments: those of MONAI's ``DDIMScheduler``.
    """

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_s, predicted x0)``; ``eta`` weighs the fresh noise (0: deterministic DDIM, 1: DDPM-like)."""
        t = int(timestep)
        s = previous_timestep(self.timesteps, t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_s = self.alphas_cumprod[s] if s >= 0 else self.final_alpha_cumprod
        x0, epsilon = predicted_original_and_noise(self.prediction_type, model_output, sample, alpha_prod_t)
        if self.clip_sample:
            x0 = torch.clamp(x0, *self.clip_sample_values)
        # sigma_t of formula (16), then x_s of formula (12)
        variance = (1 - alpha_prod_s) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_s)
        std = eta * variance**0.5
        prev = alpha_prod_s**0.5 * x0 + (1 - alpha_prod_s - std**2) ** 0.5 * epsilon
        if eta > 0:
            noise = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                                device=model_output.device)
            prev = prev + std * noise
        return prev, x0


class PLMSScheduler(PNDMScheduler):
    """PNDM's pseudo linear multi-step sampler (Liu et al. 2022, https://arxiv.org/abs/2202.09778) with a correct
    warm-up, combining noise predictions whatever the network predicts.

    With ``skip_prk_steps`` MONAI's ``PNDMScheduler`` bootstraps with a second-order step that re-evaluates the
    network at the second timestep, but leaves that timestep out of ``timesteps``: from the third call on, the
    network is told a timestep one step below the sample's. Here the second timestep appears twice, as in diffusers
    and the CompVis PLMS sampler, so ``N`` inference steps make ``N + 1`` network calls. A ``v_prediction`` output is
    turned into the noise it implies where the network was evaluated, before the multi-step combination (MONAI
    combines velocities of different timesteps and converts them at the last one). Set ``set_alpha_to_one`` so that
    the last step ends at the clean sample. Arguments: those of MONAI's ``PNDMScheduler``.
    """

    def __init__(self, *args: Any, skip_prk_steps: bool = True, **kwargs: Any) -> None:
        if not skip_prk_steps:
            raise ValueError("PLMSScheduler steps with PLMS only (skip_prk_steps=True); MONAI's Runge-Kutta warm-up "
                             "does not land on its own timesteps.")
        super().__init__(*args, skip_prk_steps=True, **kwargs)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        if len(self.plms_timesteps) > 1:
            plms = self.plms_timesteps
            self.plms_timesteps = np.concatenate([plms[:2], plms[1:]])
            self.timesteps = torch.from_numpy(self.plms_timesteps.astype(np.int64)).to(device)
            # step_plms spaces its steps by num_train_timesteps // num_inference_steps: keep N, not N + 1
            self.num_inference_steps = num_inference_steps

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(x at the next timestep, None)`` from the network output at ``(sample, timestep)``."""
        _, epsilon = predicted_original_and_noise(self.prediction_type, model_output, sample,
                                                  self.alphas_cumprod[int(timestep)])
        return super().step(epsilon, timestep, sample)

    def _get_prev_sample(self, sample: torch.Tensor, timestep: int, prev_timestep: int,
                         model_output: torch.Tensor) -> torch.Tensor:
        """Formula (9) of Liu et al. from ``x_t`` to ``x_(t - delta)``; ``model_output`` is a noise prediction."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        denominator = alpha_prod_t * (1 - alpha_prod_prev) ** 0.5 + (
            alpha_prod_t * (1 - alpha_prod_t) * alpha_prod_prev) ** 0.5
        return ((alpha_prod_prev / alpha_prod_t) ** 0.5 * sample
                - (alpha_prod_prev - alpha_prod_t) * model_output / denominator)


class ContinuousRFlowScheduler(RFlowScheduler):
    """Rectified flow (Liu et al. 2022, https://arxiv.org/abs/2209.03003) Euler steps to the exact next timestep.

    MONAI's ``RFlowScheduler.step`` truncates ``next_timestep`` to an integer, so with continuous timesteps
    (``use_discrete_timesteps=False``) every step overshoots by the fraction dropped. Arguments: those of MONAI's
    ``RFlowScheduler``.
    """

    def step(self, model_output: torch.Tensor, timestep: float, sample: torch.Tensor,
             next_timestep: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x at next_timestep, predicted x0)`` from the predicted velocity ``x0 - noise``."""
        if next_timestep is None:
            return super().step(model_output, timestep, sample, next_timestep)
        dt = (float(timestep) - float(next_timestep)) / self.num_train_timesteps
        return sample + model_output * dt, sample + model_output * float(timestep) / self.num_train_timesteps


def _target_and_settings(definition: Any) -> tuple[type, dict[str, Any]]:
    """The class and keyword arguments of a lazy definition (``functools.partial`` of a scheduler class), or the
    class and main settings of a built scheduler."""
    if isinstance(definition, partial):
        return definition.func, dict(definition.keywords)
    if isinstance(definition, nn.Module):
        return type(definition), {k: getattr(definition, k) for k in ("num_train_timesteps", "prediction_type")
                                  if hasattr(definition, k)}
    raise TypeError(f"a scheduler definition is a functools.partial (`_mode_: callable`) or a scheduler, not "
                    f"{type(definition).__name__}.")


def _accepts(definition: Any, prediction_type: str) -> bool:
    """Whether a scheduler with a ``prediction_type`` argument takes this one."""
    cls, settings = _target_and_settings(definition)
    return "prediction_type" in settings and all(
        prediction_type in allowed for base, allowed in PREDICTION_TYPES.items() if issubclass(cls, base))


def describe_scheduler(definitions: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``{"name", "class", "settings"}`` of the scheduler ``name``: its full class path and constructor arguments."""
    cls, settings = _target_and_settings(definitions[name])
    return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "settings": dict(sorted(settings.items()))}


def make_scheduler(definitions: Mapping[str, Callable[[], nn.Module] | nn.Module], name: str,
                   key: str = "sampler") -> nn.Module:
    """Build the scheduler ``name`` from its lazy definition (``_mode_: callable`` in the config).

    Only that one is built, so a prediction type that another scheduler rejects (PNDM takes no ``sample``) does not
    stop a workflow that does not use it. An already built scheduler is returned as it is.

    Args:
        definitions: name -> ``functools.partial`` of a scheduler class (or a scheduler).
        name: which one.
        key: the config key that chose ``name``, for the error messages.

    Raises:
        KeyError: ``name`` is not defined.
        ValueError: the scheduler cannot take the prediction type in its definition; the message names the ones
            that can.
    """
    if name not in definitions:
        raise KeyError(f"{key}='{name}' is not one of {sorted(definitions)}; set --{key} to one of them.")
    definition = definitions[name]
    if isinstance(definition, nn.Module):
        return definition
    cls, settings = _target_and_settings(definition)
    prediction_type = settings.get("prediction_type")
    if prediction_type is not None and not _accepts(definition, prediction_type):
        fits = [n for n, d in definitions.items() if _accepts(d, prediction_type)]
        allowed = [p for base, types in PREDICTION_TYPES.items() if issubclass(cls, base) for p in types]
        raise ValueError(f"{key}='{name}' ({cls.__name__}) cannot take prediction_type='{prediction_type}' (only "
                         f"{', '.join(allowed)}); use --{key} {' or '.join(fits) or 'another scheduler'}.")
    return definition()


def check_sampler(sampler: str, trained_with: str | None) -> None:
    """Refuse a sampler that cannot run a model trained with the other family of noise schedulers.

    Raises:
        ValueError: rectified-flow sampling of a DDPM-trained model or the reverse.
    """
    if trained_with is None:
        return
    if (sampler == "rflow") != (trained_with == "rflow"):
        fit = "rflow" if trained_with == "rflow" else "ddpm, ddim or pndm"
        raise ValueError(f"sampler='{sampler}' cannot sample a model trained with noise_scheduler_type="
                         f"'{trained_with}'; use --sampler {fit}.")


def default_sampler(noise_scheduler_type: str) -> str:
    """The fast sampler matching a training scheduler: DDIM for DDPM-family training, rectified flow for RFlow."""
    return "rflow" if noise_scheduler_type == "rflow" else "ddim"
