"""The sampling pipeline: one path for unconditional, conditioned (cross-attention or concat), guided and
ControlNet sampling."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler
from torch import nn

from scripts.sampling import LatentDiffusionPipeline, sample_latents


class Recorder(nn.Module):
    """A network whose output is a known function of its inputs, recording every call."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, timesteps, context=None, **kwargs):
        self.calls.append({"x": x.shape, "context": context, **kwargs})
        shift = 0.0 if context is None else context.reshape(context.shape[0], -1).sum(1).view(-1, 1, 1, 1, 1)
        return 0.1 * x[:, :2] + shift


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(spatial_dims=3, channels=(4, 4), latent_channels=2, num_res_blocks=1, norm_num_groups=2,
                         attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                         with_decoder_nonlocal_attn=False, include_fc=False).eval()


def pipeline(network, guidance_scale=1.0, **kwargs):
    return LatentDiffusionPipeline(network, DDIMScheduler(num_train_timesteps=20), tiny_autoencoder(), 1.0,
                                   num_inference_steps=3, guidance_scale=guidance_scale, **kwargs)


def test_unconditional_pipeline_equals_the_plain_sampling_loop():
    net = Recorder()
    noise = torch.randn(2, 2, 4, 4, 4)
    pipe = pipeline(net)
    expected = sample_latents(net, DDIMScheduler(num_train_timesteps=20), noise, 3, progress=False)
    torch.testing.assert_close(pipe.sample(noise, progress=False), expected)
    assert pipe.describe()["network_calls_per_step"] == 1
    images = pipe(noise, progress=False)
    assert images.shape == (2, 1, 8, 8, 8) and images.dtype == torch.float32


def test_classifier_free_guidance_is_uncond_plus_scale_times_difference():
    net = Recorder()
    condition, null = torch.tensor([[[1.0]], [[2.0]]]), torch.zeros(1, 1, 1)
    x, t = torch.randn(2, 2, 4, 4, 4), torch.tensor([5, 5])
    guided = pipeline(net, guidance_scale=3.0).denoiser(condition, null)(x, t)
    plain_cond = pipeline(net).denoiser(condition)(x, t)
    plain_null = pipeline(net).denoiser(null.expand_as(condition))(x, t)
    torch.testing.assert_close(guided, plain_null + 3.0 * (plain_cond - plain_null))
    assert net.calls[0]["x"][0] == 4, "the conditioned and null branches run as one batch"
    assert pipeline(net, guidance_scale=3.0).network_calls_per_step(condition, null) == 2
    with pytest.raises(ValueError, match="needs the unconditional"):
        pipeline(net, guidance_scale=3.0).denoiser(condition)


def test_concat_mode_appends_the_condition_as_channels():
    net = Recorder()
    control = torch.ones(1, 1, 4, 4, 4)
    pipeline(net, mode="concat").denoiser(control)(torch.randn(1, 2, 4, 4, 4), torch.tensor([3]))
    assert net.calls[0]["x"] == (1, 3, 4, 4, 4) and net.calls[0]["context"] is None
    with pytest.raises(ValueError, match="mode must be one of"):
        pipeline(net, mode="add")


def test_controlnet_residuals_reach_the_unet():
    """MONAI's ControlNet zero-initialises its output convolutions: at initialisation sampling with it equals
    sampling without it; after perturbing them, the control image changes the sample."""
    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 8),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4).eval()
    with torch.no_grad():
        for p in unet.out.parameters():  # MONAI zero-initialises the UNet's output too
            p.normal_(std=0.1)
    controlnet = ControlNet(spatial_dims=3, in_channels=2, channels=(8, 8), attention_levels=(False, False),
                            num_res_blocks=1, norm_num_groups=4, conditioning_embedding_in_channels=1,
                            conditioning_embedding_num_channels=(8,)).eval()
    ae = tiny_autoencoder()
    noise, control = torch.randn(1, 2, 4, 4, 4), torch.rand(1, 1, 4, 4, 4)
    sampler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
    plain = LatentDiffusionPipeline(unet, sampler, ae, 1.0, 3).sample(noise, progress=False)
    with_control = LatentDiffusionPipeline(unet, sampler, ae, 1.0, 3, controlnet=controlnet)
    torch.testing.assert_close(with_control.sample(noise, control=control, progress=False), plain)
    with torch.no_grad():
        for p in controlnet.controlnet_mid_block.parameters():
            p.normal_(std=0.5)
    assert not torch.allclose(with_control.sample(noise, control=control, progress=False), plain)
    with pytest.raises(ValueError, match="give its control image"):
        with_control.sample(noise, progress=False)
