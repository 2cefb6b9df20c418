"""The diffusion maths, scheduler-agnostic: training timesteps and targets, the sampling loop, latent decoding.

Schedulers are MONAI's (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``, ``RFlowScheduler``), all with the
same ``set_timesteps`` / ``step`` interface; the sampling loop receives network and scheduler as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.inferers import Inferer, SimpleInferer
from monai.networks.schedulers import DDPMScheduler, PNDMScheduler, RFlowScheduler
from torch import nn

from scripts.networks import AutoencoderDecoder

__all__ = [
    "decode_latents", "diffusion_target", "pick_scheduler", "sample_generators", "sample_latents", "sample_timesteps",
]


def pick_scheduler(schedulers: Mapping[str, nn.Module], name: str, key: str = "sampler") -> nn.Module:
    """The scheduler named ``name`` among the configured ones, with a clear error naming the config key."""
    if name not in schedulers:
        raise KeyError(f"{key}='{name}' is not one of {sorted(schedulers)}; set --{key} to one of them.")
    return schedulers[name]


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


def sample_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One random generator per sample index, so that sample ``i`` depends only on ``(seed, i)``."""
    return [torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(i)) for i in indices]


def sample_latents(
    network: nn.Module,
    scheduler: nn.Module,
    noise: torch.Tensor,
    num_inference_steps: int,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (latent space, ``(B, C, *latent_spatial)``) to clean latents.

    Stochastic steps (DDPM, DDIM with eta > 0) draw their noise per sample from ``generators``, so a sample does
    not depend on the batch it was drawn in.
    """
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(num_inference_steps, device=noise.device, input_img_size_numel=int(noise[0, 0].numel()))
    else:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    if isinstance(scheduler, PNDMScheduler):  # PNDM keeps a history of model outputs across steps
        scheduler.ets, scheduler.counter, scheduler.cur_sample = [], 0, None
    timesteps = list(scheduler.timesteps)
    next_timesteps = timesteps[1:] + [0]
    steps = zip(timesteps, next_timesteps, strict=True)
    if progress:
        from tqdm import tqdm

        steps = tqdm(list(steps), desc=desc, leave=False)
    x = noise
    per_sample = generators is not None and isinstance(scheduler, DDPMScheduler)
    for t, next_t in steps:
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        if not isinstance(scheduler, RFlowScheduler):
            t_batch = t_batch.long()
        with torch.no_grad():
            model_output = network(x, timesteps=t_batch)
        if isinstance(scheduler, RFlowScheduler):
            x, _ = scheduler.step(model_output, t, x, next_t)
        elif per_sample:
            x = torch.cat([scheduler.step(model_output[i : i + 1], t, x[i : i + 1], generator=g)[0]
                           for i, g in enumerate(generators)])
        else:
            x, _ = scheduler.step(model_output, t, x)
    return x


def decode_latents(
    autoencoder: nn.Module, latents: torch.Tensor, scale_factor: float, inferer: Inferer | None = None
) -> torch.Tensor:
    """Decode diffusion latents to images: ``decoder(latents / scale_factor)``, tiled when ``inferer`` is a
    ``SlidingWindowInferer`` over the latent (its output is upsampled by the autoencoder's factor)."""
    decoder = AutoencoderDecoder(autoencoder, scale_factor).eval()
    with torch.no_grad():
        return (inferer or SimpleInferer())(latents, decoder)


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


def default_preview_sampler(noise_scheduler_type: str) -> str:
    """The fast sampler matching a training scheduler: DDIM for DDPM training, rectified flow for RFlow."""
    return "rflow" if noise_scheduler_type == "rflow" else "ddim"
