"""The diffusion maths, scheduler-agnostic: training timesteps and targets, the sampling loop, latent decoding.

Schedulers are MONAI's (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``, ``RFlowScheduler``; the sampling
variants in :mod:`scripts.schedulers`), all with the same ``set_timesteps`` / ``step`` interface; the sampling loop
receives network and scheduler as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SimpleInferer
from monai.networks.schedulers import DDPMScheduler, PNDMScheduler, RFlowScheduler
from torch import nn

from scripts.networks import AutoencoderDecoder

__all__ = ["decode_latents", "diffusion_target", "sample_generators", "sample_latents", "sample_timesteps"]


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
