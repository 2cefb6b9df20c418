"""Samplers against an exact denoiser: for data of a known distribution the best network output (the conditional
mean of the training target given the noisy latent) is known in closed form at every timestep, so a correct sampler
must land on the data, and must show the network, at every call, a latent of the noise level it names.

The schedulers are built from ``configs/common.json#schedulers`` as the workflows build them.
"""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from scripts.diffusion import diffusion_target
from scripts.sampling import sample_latents
from scripts.schedulers import (
    ContinuousRFlowScheduler,
    RespacedDDPMScheduler,
    make_scheduler,
)
from tests.helpers import ROOT

SHAPE = (1, 4, 4, 4, 4)


def configured_schedulers(prediction_type: str = "epsilon") -> dict:
    """The lazy scheduler definitions of ``configs/common.json`` with ``prediction_type``."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "common.json"))
    parser["prediction_type"] = prediction_type
    return parser.get_parsed_content("schedulers")


def levels(scheduler: torch.nn.Module, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signal, noise)`` scales of ``x_t = signal * x0 + noise * epsilon`` at each timestep, shaped to broadcast."""
    shape = (-1, 1, 1, 1, 1)
    if isinstance(scheduler, RFlowScheduler):  # x_t = (1 - t / T) x0 + (t / T) noise
        tau = (timesteps.double() / scheduler.num_train_timesteps).view(shape)
        return 1 - tau, tau
    alpha_prod = scheduler.alphas_cumprod.double()[timesteps.long()].view(shape)
    return alpha_prod.sqrt(), (1 - alpha_prod).sqrt()


class ExactDenoiser:
    """The optimal network for data ``x0 ~ N(mean, std^2)`` elementwise (``std = 0``: the single latent ``mean``).

    Returns the training target (:func:`scripts.diffusion.diffusion_target`: noise, velocity, clean latent or the
    rectified-flow velocity) of ``E[x0 | x_t]`` and ``E[epsilon | x_t]``, which is the target's conditional mean since
    the target is linear in both. Keeps every ``(x_t, t)`` it is called with.
    """

    def __init__(self, scheduler: torch.nn.Module, mean: torch.Tensor, std: float = 0.0) -> None:
        self.scheduler, self.mean, self.var = scheduler, mean.double(), float(std) ** 2
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), timesteps.clone()))
        signal, noise = levels(self.scheduler, timesteps)
        xt = x.double()
        x0 = self.mean + signal * self.var * (xt - signal * self.mean) / (signal**2 * self.var + noise**2)
        epsilon = (xt - signal * x0) / noise
        return diffusion_target(self.scheduler, x0.float(), epsilon.float(), timesteps)


CASES = (
    [("ddpm", n, p) for n in (1000, 50, 7) for p in ("epsilon", "v_prediction", "sample")]
    + [("ddim", n, p) for n in (1, 7, 50) for p in ("epsilon", "v_prediction", "sample")]
    + [("pndm", n, p) for n in (7, 50) for p in ("epsilon", "v_prediction")]
    + [("rflow", n, "epsilon") for n in (1, 7, 30)]
)


@pytest.mark.parametrize("sampler,steps,prediction_type", CASES, ids=[f"{s}-{n}-{p}" for s, n, p in CASES])
def test_exact_denoiser_of_one_latent_is_sampled_back_to_it(sampler, steps, prediction_type):
    """Data = one known latent: every sampler, with few or many steps, ends on it (no residual noise), and each
    network call sees a latent at the noise level of the timestep it is given (so no step is skipped or misplaced)."""
    scheduler = make_scheduler(configured_schedulers(prediction_type), sampler)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    oracle = ExactDenoiser(scheduler, x0)
    out = sample_latents(oracle, scheduler, noise, steps, [torch.Generator().manual_seed(1)], progress=False)

    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)
    first_signal, first_noise = levels(scheduler, oracle.calls[0][1])
    z = (noise.double() - first_signal * x0) / first_noise  # the noise the trajectory carries
    for x, t in oracle.calls:
        signal, scale = levels(scheduler, t)
        if isinstance(scheduler, DDPMScheduler):  # ancestral: a fresh draw of the noise at every step
            told = (x.double() - signal * x0) / scale
            assert abs(float(told.std()) - 1) < 0.2 and abs(float(told.mean())) < 0.2, (int(t[0]), float(told.std()))
        else:  # deterministic: on the one trajectory from the starting noise
            torch.testing.assert_close(x.double(), signal * x0 + scale * z, atol=2e-4, rtol=0)


@pytest.mark.parametrize("sampler,steps,tolerance", [("ddim", 50, 0.08), ("pndm", 50, 0.005), ("rflow", 30, 0.05)])
def test_deterministic_samplers_follow_the_probability_flow_of_gaussian_data(sampler, steps, tolerance):
    """Data ~ N(mean, 0.5^2): the exact probability-flow map takes the starting noise to ``mean + 0.5 * z``, with
    ``z`` the starting noise in units of its level; few-step samplers approach it."""
    std = 0.5
    scheduler = make_scheduler(configured_schedulers("v_prediction"), sampler)
    g = torch.Generator().manual_seed(0)
    mean, noise = torch.randn(SHAPE, generator=g), torch.randn((2, *SHAPE[1:]), generator=g)
    oracle = ExactDenoiser(scheduler, mean, std)
    out = sample_latents(oracle, scheduler, noise, steps, progress=False)
    signal, scale = levels(scheduler, oracle.calls[0][1][:1])
    exact = mean + std * (noise - signal.float() * mean) / (signal.float() ** 2 * std**2 + scale.float() ** 2).sqrt()
    assert float((out - exact).abs().mean()) < tolerance * std


@pytest.mark.parametrize("steps,low,high", [(1000, 0.95, 1.05), (50, 0.8, 1.05)])
def test_ddpm_samples_gaussian_data_with_its_spread(steps, low, high):
    """Data ~ N(mean, 0.5^2): DDPM samples have the data's mean and nearly its spread, with all timesteps or fewer
    (ancestral sampling with the posterior mean under-disperses a little in big jumps)."""
    std = 0.5
    scheduler = make_scheduler(configured_schedulers(), "ddpm")
    g = torch.Generator().manual_seed(0)
    mean, noise = torch.randn(SHAPE, generator=g), torch.randn((8, *SHAPE[1:]), generator=g)
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    out = sample_latents(ExactDenoiser(scheduler, mean, std), scheduler, noise, steps, generators, progress=False)
    z = (out - mean) / std
    assert abs(float(z.mean())) < 0.1 and low < float(z.std()) < high, (float(z.mean()), float(z.std()))


def test_respaced_ddpm_with_all_timesteps_is_monai_ddpm():
    kwargs = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195,
              "clip_sample": False, "prediction_type": "v_prediction"}
    ours, monai_ddpm = RespacedDDPMScheduler(**kwargs), DDPMScheduler(**kwargs)
    g = torch.Generator().manual_seed(0)
    x, output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in (999, 500, 1, 0):
        a = ours.step(output, t, x, generator=torch.Generator().manual_seed(t))[0]
        b = monai_ddpm.step(output, t, x, generator=torch.Generator().manual_seed(t))[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rectified_flow_steps_to_a_continuous_next_timestep():
    scheduler = ContinuousRFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
    scheduler.set_timesteps(4)
    x, velocity = torch.zeros(SHAPE), torch.ones(SHAPE)
    torch.testing.assert_close(scheduler.step(velocity, 500.5, x, 250.25)[0], torch.full(SHAPE, 0.25025))


def test_sample_prediction_builds_only_the_schedulers_used_and_refuses_pndm():
    """`prediction_type: sample` resolves (PNDM, which rejects it, is not built unless asked for), and asking for PNDM
    fails with one line naming the samplers that can."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "common.json"))
    parser["noise_scheduler_type"], parser["prediction_type"] = "ddpm", "sample"
    assert parser.get_parsed_content("noise_scheduler").prediction_type == "sample"
    definitions = parser.get_parsed_content("schedulers")
    assert make_scheduler(definitions, "ddim").prediction_type == "sample"
    with pytest.raises(ValueError, match=r"sampler='pndm' \(PLMSScheduler\) cannot take prediction_type='sample' "
                                         r"\(only epsilon, v_prediction\); use --sampler ddpm or ddim\.$"):
        make_scheduler(definitions, "pndm")
    with pytest.raises(KeyError, match="sampler='euler' is not one of"):
        make_scheduler(definitions, "euler")
