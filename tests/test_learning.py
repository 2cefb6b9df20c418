"""The pipeline learns: a seeded short run on tiny 32^3 demo data beats trivial baselines (no timing here).

Stage 1: the test-split reconstruction PSNR beats the PSNR of the input blurred with a Gaussian of
``BLUR_SIGMA`` voxels by ``PSNR_MARGIN_DB``. Stage 2: on held-out (validation) latents, the denoising error of the
trained (EMA) network beats both the zero predictor and the untrained network, at low and at high noise levels.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, overrides_for

BLUR_SIGMA = 1.0  # voxels
PSNR_MARGIN_DB = 1.0
DENOISING_MARGIN = 0.8  # trained error at most this fraction of the baseline's


def _workflow(config_file, **overrides):
    from monai.bundle import ConfigWorkflow

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        workflow = ConfigWorkflow(config_file=config_file, workflow_type=None, logging_file="configs/logging.conf",
                                  **overrides)
        workflow.initialize()
        workflow.run()
        return workflow
    finally:
        os.chdir(cwd)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((np.clip(a, 0, 1) - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning")
    stage1 = _workflow("configs/train_autoencoder.json", **overrides_for(tmp, max_epochs=40, val_interval=100, seed=0))
    recon = _workflow("configs/inference_autoencoder.json", **overrides_for(tmp, infer=True))
    stage2 = _workflow(["configs/train_autoencoder.json", "configs/train_diffusion.json"],
                       **overrides_for(tmp, stage2=True, max_epochs=60, val_interval=1000, train_batch_size=4,
                                       seed=0))
    return tmp, stage1, recon, stage2


def test_stage1_reconstruction_beats_blurred_input(trained):
    from scipy.ndimage import gaussian_filter

    tmp = trained[0]
    run = max((tmp / "outputs").glob("reconstruction_*"))
    summary = json.loads((run / "summary.json").read_text())
    import nibabel as nib

    blurred = []
    for f in sorted(run.glob("*_input.nii.gz")):
        x = np.asarray(nib.load(f).dataobj, dtype=np.float32)
        blurred.append(_psnr(gaussian_filter(x, BLUR_SIGMA), x))
    assert blurred, "reconstruction wrote no inputs"
    baseline = float(np.mean(blurred))
    assert summary["psnr"]["mean"] > baseline + PSNR_MARGIN_DB, (summary["psnr"]["mean"], baseline)


def _denoising_errors(network, scheduler, latents, t_fraction, seed=0, draws=8):
    """Mean squared error of ``network``'s prediction and of the zero predictor, over ``draws`` noise draws."""
    from scripts.diffusion import diffusion_target

    latents = latents.repeat(draws, *([1] * (latents.ndim - 1)))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.full((latents.shape[0],), t_fraction * scheduler.num_train_timesteps)
    t = t if type(scheduler).__name__ == "RFlowScheduler" else t.long().clamp_max(scheduler.num_train_timesteps - 1)
    noisy = scheduler.add_noise(latents, noise, t)
    target = diffusion_target(scheduler, latents, noise, t)
    with torch.no_grad():
        prediction = network(noisy, timesteps=t)
    return float(torch.mean((prediction - target) ** 2)), float(torch.mean(target**2))


@pytest.mark.parametrize("t_fraction", [0.1, 0.5, 0.9])
def test_stage2_held_out_denoising_beats_zero_and_untrained(trained, t_fraction):
    stage2 = trained[3]
    parsed = stage2.parser.get_parsed_content
    scale = parsed("scale_factor")
    latents = torch.stack([p["z_mu"] for p in parsed("validate#posteriors")]) * scale
    scheduler = parsed("noise_scheduler")
    torch.manual_seed(0)
    untrained = parsed("network_def", lazy=False).eval()  # a fresh instance, not the trained one
    trained_error, zero_error = _denoising_errors(parsed("validate#network").eval(), scheduler, latents, t_fraction)
    untrained_error, _ = _denoising_errors(untrained, scheduler, latents, t_fraction)
    assert trained_error < DENOISING_MARGIN * zero_error, (trained_error, zero_error)
    assert trained_error < DENOISING_MARGIN * untrained_error, (trained_error, untrained_error)
