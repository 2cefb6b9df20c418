"""Weights from the older monai-generative package and from the Model Zoo BraTS bundle load through our configs."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.schedulers import make_scheduler
from scripts.weights import load_weights
from tests.helpers import COMMON, ROOT, TINY, TINY_DIFFUSION, config_network, overrides_for, run_bundle

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # monai-generative's deprecated torch.cuda.amp decorators
    generative_nets = pytest.importorskip("generative.networks.nets", reason="monai-generative is a dev dependency")


def _randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero values everywhere (the UNet's output convolution starts at zero, which would hide any mismatch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _old_autoencoder(channels, latent_channels, num_res_blocks, norm_num_groups):
    return generative_nets.AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=latent_channels, num_channels=channels,
        num_res_blocks=num_res_blocks, norm_num_groups=norm_num_groups, norm_eps=1e-6,
        attention_levels=[False] * len(channels), with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def _old_unet(channels, attention_levels, num_head_channels, num_res_blocks, norm_num_groups, latent_channels):
    return generative_nets.DiffusionModelUNet(
        spatial_dims=3, in_channels=latent_channels, out_channels=latent_channels, num_channels=channels,
        attention_levels=attention_levels, num_head_channels=num_head_channels, num_res_blocks=num_res_blocks,
        norm_num_groups=norm_num_groups)


def test_monai_generative_weights_give_the_same_reconstructions_and_samples(tmp_path):
    """A tiny autoencoder and UNet built and saved with monai-generative; our inference configs load them (old key
    layout converted) and reconstruct and generate exactly what the old models compute."""
    from scripts.sampling import decode_latents, initial_noise, sample_latents

    ae = _randomise(_old_autoencoder(TINY["autoencoder_channels"], 4, 1, TINY["autoencoder_norm_num_groups"]), 0)
    unet = _randomise(_old_unet(TINY_DIFFUSION["diffusion_channels"], [False, False, True],
                                TINY_DIFFUSION["diffusion_num_head_channels"], 1,
                                TINY_DIFFUSION["diffusion_norm_num_groups"], 4), 1)
    (tmp_path / "models").mkdir()
    torch.save(ae.state_dict(), tmp_path / "models" / "model_autoencoder.pt")
    torch.save(unet.state_dict(), tmp_path / "models" / "model.pt")

    # float32 (--amp false): the comparison is with the old models in float32
    proc = run_bundle([COMMON, "configs/inference_autoencoder.json"], overrides_for(tmp_path, infer=True, amp=False))
    assert "converted the old monai-generative layout" in proc.stdout
    out = next((tmp_path / "outputs").glob("reconstruction_*"))
    for recon_file in sorted(out.glob("*_reconstruction.nii.gz")):
        image = nib.load(str(recon_file).replace("_reconstruction", "_input")).get_fdata(dtype=np.float32)
        with torch.no_grad():
            expected = ae.reconstruct(torch.from_numpy(image)[None, None])[0, 0].numpy()
        np.testing.assert_allclose(nib.load(recon_file).get_fdata(), expected, atol=1e-4)

    steps, scale, seed = 3, 0.7, 5
    run_bundle([COMMON, "configs/inference.json"],
               overrides_for(tmp_path, generate=True, use_ema="False", scale_factor=scale, sampler="ddim",
                             noise_scheduler_type="ddpm", num_samples=1, num_inference_steps=steps, seed=seed,
                             amp=False))
    sample = nib.load(next((tmp_path / "outputs").glob("generated_*")) / "sample_0000.nii.gz").get_fdata()
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "common.json"))
    scheduler = make_scheduler(parser.get_parsed_content("schedulers"), "ddim")  # as generation builds it
    latents = sample_latents(unet, scheduler, initial_noise([4, 8, 8, 8], [0], seed, "cpu"), steps, progress=False)
    expected = decode_latents(ae, latents, scale)[0, 0].numpy()
    np.testing.assert_allclose(sample, expected, atol=1e-4)


def test_brats_reference_weights_load_with_brats_overlay(tmp_path, monkeypatch):
    """Plain state dicts of the Model Zoo BraTS bundle's sizes (old monai-generative layout, as it ships them) load
    through `['configs/common.json','configs/inference.json','configs/brats.json']`; one forward each matches the old
    networks."""
    ae = _randomise(_old_autoencoder([64, 128, 256], 8, 2, 32), 0)
    unet = _randomise(_old_unet([256, 256, 512], [False, True, True], [0, 64, 64], 2, 32, 8), 1)
    models = tmp_path / "models"
    models.mkdir()
    torch.save(ae.state_dict(), models / "model_autoencoder.pt")
    torch.save(unet.state_dict(), models / "model.pt")

    monkeypatch.chdir(ROOT)  # macros are relative to the bundle root, as for `monai.bundle run`
    wf = ConfigWorkflow(config_file=[COMMON, "configs/inference.json", "configs/brats.json"], workflow_type="infer",
                        meta_file="configs/metadata.json", logging_file=False, model_dir=str(models),
                        output_dir=str(tmp_path / "outputs"), use_ema=False, scale_factor=1.0)
    wf.initialize()  # loads both files through scripts.weights.load_weights, as generation does
    new_ae, new_unet = wf.parser.get_parsed_content("autoencoder"), wf.parser.get_parsed_content("diffusion")
    z, t = torch.randn(1, 8, 4, 4, 4), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(new_unet(z, timesteps=t), unet(z, timesteps=t), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(new_ae.decode(z), ae.decode(z), atol=1e-4, rtol=1e-4)


def test_missing_or_foreign_weights_fail_with_one_clear_line(tmp_path):
    net = config_network("network_def", TINY_DIFFUSION)
    with pytest.raises(FileNotFoundError) as missing:
        load_weights(net, str(tmp_path / "model_ema.pt"), what="diffusion model")
    message = str(missing.value)
    assert "download_large_files" in message and "large_files.yml" in message
    assert "configs/train_diffusion.json" in message

    old = _old_unet([8, 16, 32], [False, False, True], [0, 0, 8], 1, 4, 4)  # another size, old layout
    torch.save(old.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="old monai-generative layout but does not match the network in the config"):
        load_weights(net, str(tmp_path / "model.pt"), what="diffusion model")
