"""The pipeline learns: a seeded short run on tiny 32^3 demo data beats trivial baselines (no timing here).

Stage 1: the test-split reconstruction PSNR beats that of the input blurred by a Gaussian of ``BLUR_SIGMA`` voxels,
by ``PSNR_MARGIN_DB``. Stage 2: on held-out (validation) latents, the denoising error of the saved EMA weights beats
the zero predictor and the untrained network at low, middle and high noise levels.

MONAI's ``DiffusionModelUNet`` starts with a zero output convolution, so the untrained network *is* the zero
predictor; the test checks that too, so that a change of initialisation cannot make the baseline silently weaker.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tests.helpers import COMMON, ROOT, overrides_for, run_bundle

STAGE1 = [COMMON, "configs/train_autoencoder.json"]
STAGE2 = [COMMON, "configs/train_diffusion.json"]
RECONSTRUCT = [COMMON, "configs/inference_autoencoder.json"]

BLUR_SIGMA = 2.0  # voxels: the 4x-downsampling autoencoder must keep more detail than this blur
PSNR_MARGIN_DB = 1.0
DENOISING_MARGIN = 0.8  # the trained error is at most this fraction of the baseline's
# whole 32^3 volumes (8 training subjects), an autoencoder a little wider than the other tests' (measured: 21.8 dB
# after 100 epochs against 20.0 dB for the blurred input; 18.7 dB after 30 epochs)
LEARNING = {"demo_num_subjects": 12, "autoencoder_channels": [8, 16, 16]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning")
    run_bundle(STAGE1, overrides_for(tmp, max_epochs=100, val_interval=1000, lr=1e-3, seed=0,
                                     train_patch_size=[32, 32, 32], **LEARNING))
    run_bundle(RECONSTRUCT, overrides_for(tmp, infer=True, split="test", **LEARNING))
    stage2 = overrides_for(tmp, stage2=True, max_epochs=40, val_interval=1000, train_batch_size=4, lr=2e-3,
                           lr_warmup_iterations=10, seed=0, **LEARNING)
    run_bundle(STAGE2, stage2)
    return tmp, stage2


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((np.clip(a, 0, 1) - b) ** 2)), 1e-12)))


def test_stage1_reconstruction_beats_blurred_input(trained):
    run = max((trained[0] / "outputs").glob("reconstruction_*"))
    summary = json.loads((run / "summary.json").read_text())
    inputs = sorted(run.glob("*_input.nii.gz"))
    assert len(inputs) == 2, "reconstruction of the 2 test subjects"
    blurred = [_psnr(gaussian_filter(x, BLUR_SIGMA), x)
               for x in (np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in inputs)]
    assert summary["psnr"]["mean"] > float(np.mean(blurred)) + PSNR_MARGIN_DB, (summary["psnr"], blurred)


def _stage2_parts(tmp, overrides):
    """The configured network, scheduler and held-out latents (scaled as in training)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in STAGE2])
    parser.update({"bundle_root": str(ROOT), **overrides})
    record = json.loads((tmp / "models" / "model_record.json").read_text())
    cache = next((tmp / "cache").glob("latents_validation_*.pt"))
    latents = torch.stack([p["z_mu"] for p in torch.load(cache, weights_only=True)]) * record["scale_factor"]
    return parser, latents


def _errors(network, scheduler, latents, t_fraction, draws=8):
    """Mean squared error of ``network``'s prediction of the training target, and that of the zero predictor."""
    from monai.networks.schedulers import RFlowScheduler

    from scripts.diffusion import diffusion_target

    latents = latents.repeat(draws, *([1] * (latents.ndim - 1)))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((latents.shape[0],), t_fraction * scheduler.num_train_timesteps)
    if not isinstance(scheduler, RFlowScheduler):
        t = t.long().clamp_max(scheduler.num_train_timesteps - 1)
    noisy = scheduler.add_noise(latents, noise, t)
    target = diffusion_target(scheduler, latents, noise, t)
    with torch.no_grad():
        prediction = network(noisy, timesteps=t)
    return float(torch.mean((prediction - target) ** 2)), float(torch.mean(target**2))


@pytest.fixture(scope="module")
def networks(trained):
    tmp, overrides = trained
    parser, latents = _stage2_parts(tmp, overrides)
    torch.manual_seed(0)
    untrained = parser.get_parsed_content("network_def", lazy=False).eval()
    ema = parser.get_parsed_content("network_def", lazy=False)
    ema.load_state_dict(torch.load(tmp / "models" / "model_ema.pt", weights_only=True))
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), untrained.state_dict().values(),
                                                      strict=True))
    return ema.eval(), untrained, parser.get_parsed_content("noise_scheduler"), latents


@pytest.mark.parametrize("t_fraction", [0.1, 0.5, 0.9])
def test_stage2_held_out_denoising_beats_zero_and_untrained(networks, t_fraction):
    ema, untrained, scheduler, latents = networks
    assert latents.shape[0] == 2, "the 2 validation subjects"
    trained_error, zero_error = _errors(ema, scheduler, latents, t_fraction)
    untrained_error, _ = _errors(untrained, scheduler, latents, t_fraction)
    assert trained_error < DENOISING_MARGIN * zero_error, (trained_error, zero_error)
    assert trained_error < DENOISING_MARGIN * untrained_error, (trained_error, untrained_error)
