"""Stage 2 and generation end to end through `python -m monai.bundle run`, on tiny demo data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.storage import file_sha256
from tests.helpers import COMMON, config_network, copied, overrides_for, run_bundle

STAGE1 = [COMMON, "configs/train_autoencoder.json"]
STAGE2 = [COMMON, "configs/train_diffusion.json"]
STAGE2_AFTER_STAGE1 = [COMMON, "configs/train_autoencoder.json", "configs/train_diffusion.json"]
GENERATE = [COMMON, "configs/inference.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage2")
    run_bundle(STAGE1, overrides_for(tmp, max_epochs=2, val_interval=5, lr=1e-3))
    ov = overrides_for(tmp, stage2=True, max_epochs=2, val_interval=2, train_batch_size=2, val_batch_size=2,
                       preview_steps=3, preview_num_samples=1, lr_warmup_iterations=2, noise_scheduler_type="ddpm",
                       prediction_type="v_prediction")
    proc = run_bundle(STAGE2, ov)
    return tmp, ov, proc


def test_stage2_writes_weights_cache_previews_and_scale_factor(trained):
    tmp, _, proc = trained
    models = tmp / "models"
    for name in ("model.pt", "model_ema.pt", "model_best.pt", "checkpoint_diffusion.pt"):
        assert (models / name).is_file(), name
    state = torch.load(models / "checkpoint_diffusion.pt", weights_only=True)
    assert {"diffusion", "ema", "optimizer", "lr_scheduler", "step", "engine", "record"} <= set(state)
    record = json.loads((models / "model_record.json").read_text())
    assert state["engine"]["epoch"] == 2 == record["epoch"]
    assert {k: v for k, v in record.items() if k in state["record"]} == state["record"]
    assert record["noise_scheduler_type"] == "ddpm" and record["prediction_type"] == "v_prediction"
    assert 0.05 < record["scale_factor"] < 20
    assert f"latent scale factor: {round(record['scale_factor'], 5)}" in proc.stdout
    assert record["latent_shape"] == [4, 8, 8, 8] and record["spacing"] == [3.0, 3.0, 3.0]
    assert record["orientation"] == "RAS"
    assert record["noise_scheduler"]["class"] == "scripts.schedulers.RespacedDDPMScheduler"
    assert record["noise_scheduler"]["settings"]["prediction_type"] == "v_prediction"
    assert {k: record["noise_scheduler"]["settings"][k] for k in ("num_train_timesteps", "beta_start", "beta_end")} == {
        k: record[k] for k in ("num_train_timesteps", "beta_start", "beta_end")}
    assert record["intensity_scaling"]["lower"] == 0.0 and record["intensity_scaling"]["upper"] == 99.5
    assert record["autoencoder_sha256"] == file_sha256(models / "model_autoencoder.pt")
    assert record["weights_sha256"] == {name: file_sha256(models / name) for name in ("model.pt", "model_ema.pt")}
    ema = torch.load(models / "model_ema.pt", weights_only=True)
    raw = torch.load(models / "model.pt", weights_only=True)
    assert set(ema) == set(raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)
    caches = sorted(p.name for p in (tmp / "cache").glob("latents_*.pt"))
    assert [c.split("_")[1] for c in caches] == ["training", "validation"]
    cached = torch.load(tmp / "cache" / caches[0], weights_only=True)
    assert set(cached[0]) == {"z_mu", "z_sigma", "source"} and cached[0]["z_mu"].shape == (4, 8, 8, 8)
    run_dir = max((tmp / "outputs").glob("train_diffusion_*"))
    assert (run_dir / "previews" / "stage2_samples_epoch0002.png").is_file()
    assert (run_dir / "loss_curves.png").is_file()
    assert "Metrics -- val_loss" in proc.stdout + proc.stderr


def assert_provenance(run_dir, overrides, seed, inputs=()):
    """A run folder holds the merged config as it ran (overrides applied and typed) and provenance.json."""
    config = json.loads((run_dir / "config.json").read_text())
    for key, value in overrides.items():
        assert config[key] == value, key
    facts = json.loads((run_dir / "provenance.json").read_text())
    assert facts["seed"] == seed and facts["command"][1:4] == ["-m", "monai.bundle", "run"]
    assert {"python", "torch", "monai", "pytorch-ignite", "nibabel"} <= set(facts["versions"])
    assert set(facts["inputs_sha256"]) == set(inputs)


def test_every_training_run_writes_its_merged_config_and_provenance(trained):
    """python -m monai.bundle run (not only main.py) leaves the merged config, versions, seed and input hashes."""
    tmp, _, _ = trained
    stage1 = max((tmp / "outputs").glob("train_autoencoder_*"))
    assert_provenance(stage1, {"max_epochs": 2, "val_interval": 5}, seed=0)
    stage2 = max((tmp / "outputs").glob("train_diffusion_*"))
    assert_provenance(stage2, {"max_epochs": 2, "prediction_type": "v_prediction"}, seed=0, inputs=["autoencoder"])
    facts = json.loads((stage2 / "provenance.json").read_text())
    assert facts["inputs_sha256"]["autoencoder"] == file_sha256(tmp / "models" / "model_autoencoder.pt")


def test_stage2_layered_after_stage1_resumes_and_reuses_cache(trained, tmp_path):
    """The Model Zoo BraTS layering (common, train_autoencoder, train_diffusion) continues the same run."""
    tmp, ov, _ = trained
    ov = copied(ov, tmp_path)  # the other tests read the 2-epoch run
    proc = run_bundle(STAGE2_AFTER_STAGE1, {**ov, "max_epochs": 3, "resume": True, "val_interval": 10})
    assert "resumed from" in proc.stdout and "[latents] encoded" not in proc.stdout
    state = torch.load(tmp_path / "models" / "checkpoint_diffusion.pt", weights_only=True)
    assert state["engine"]["epoch"] == 3


def test_generation_writes_nifti_montage_and_manifest(trained):
    tmp, _, _ = trained
    ov = overrides_for(tmp, generate=True, num_samples=3, batch_size=2, sampler="ddim", num_inference_steps=4, seed=7)
    proc = run_bundle(GENERATE, ov)
    runs = sorted((tmp / "outputs").glob("generated_*"))
    out = runs[-1]
    assert str(out) in proc.stdout and "samples.png" in proc.stdout
    files = sorted(p.name for p in out.glob("sample_*.nii.gz"))
    assert files == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    img = nib.load(out / files[0])
    assert img.shape == (32, 32, 32)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (3.0, 3.0, 3.0))
    np.testing.assert_allclose(img.affine[:3, 3], [-46.5, -46.5, -46.5])
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    record_path = tmp / "models" / "model_record.json"
    record = json.loads(record_path.read_text())
    assert manifest["num_inference_steps"] == 4 and manifest["seed"] == 7
    assert manifest["scale_factor"] == pytest.approx(record["scale_factor"])
    assert manifest["prediction_type"] == "v_prediction" == manifest["scheduler"]["settings"]["prediction_type"]
    assert manifest["scheduler"]["class"] == "scripts.schedulers.RespacedDDIMScheduler"
    assert manifest["training_record_path"] == str(record_path)
    assert manifest["training_record_sha256"] == file_sha256(record_path)
    assert manifest["diffusion_path"].endswith("model_ema.pt") and len(manifest["diffusion_sha256"]) == 16
    assert (out / "samples.png").stat().st_size > 1000
    assert manifest["network_calls_per_step"] == 1 and manifest["guidance_scale"] == 1.0
    assert_provenance(out, {"num_samples": 3, "sampler": "ddim", "seed": 7}, seed=7)

    # the same seed reproduces the samples in a new folder; nothing earlier is overwritten
    run_bundle(GENERATE, {**ov, "batch_size": 1, "num_samples": 1})
    again = max((tmp / "outputs").glob("generated_*"))
    assert again != out
    np.testing.assert_allclose(nib.load(again / files[0]).get_fdata(), img.get_fdata(), atol=1e-5)


def test_generation_refuses_a_sampler_of_the_other_family(trained):
    tmp, _, _ = trained
    proc = run_bundle(GENERATE, overrides_for(tmp, generate=True, sampler="rflow"), check=False)
    assert proc.returncode != 0
    last = proc.stderr.splitlines()[-1]
    assert "sampler='rflow' cannot sample a model trained with noise_scheduler_type='ddpm'" in last


def test_generation_refuses_an_override_that_contradicts_the_training_record(trained):
    tmp, _, _ = trained
    proc = run_bundle(GENERATE, overrides_for(tmp, generate=True, prediction_type="epsilon"), check=False)
    assert proc.returncode != 0
    assert (f"prediction_type='epsilon' contradicts the training record {tmp / 'models' / 'model_record.json'}, "
            "where prediction_type='v_prediction'; drop --prediction_type") in proc.stderr.splitlines()[-1]


def test_generation_rejects_inconsistent_image_size(trained):
    tmp, _, _ = trained
    proc = run_bundle(GENERATE, overrides_for(tmp, generate=True, image_size=[30, 32, 32]), check=False)
    last = proc.stderr.splitlines()[-1]
    assert "image_size=[30, 32, 32] is not divisible by the autoencoder's downsampling factor 4" in last


def test_ckpt_export_unet_and_decoder_match_eager(trained):
    """`monai.bundle ckpt_export` traces the UNet (timestep in the last channel) and the decoder path."""
    tmp, _, _ = trained
    models = tmp / "models"
    ov = overrides_for(tmp, generate=True)
    run_bundle(GENERATE, {**ov, "net_id": "export_unet_def", "filepath": str(tmp / "unet.ts"), "use_trace": True,
                          "input_shape": [1, 5, 8, 8, 8], "ckpt_file": str(models / "model_ema.pt"),
                          "meta_file": "configs/metadata.json"}, subcommand="ckpt_export")
    run_bundle(GENERATE, {**ov, "net_id": "export_decoder_def", "filepath": str(tmp / "decoder.ts"), "use_trace": True,
                          "input_shape": [1, 4, 8, 8, 8], "ckpt_file": str(models / "model_autoencoder.pt"),
                          "meta_file": "configs/metadata.json"}, subcommand="ckpt_export")
    unet = config_network("network_def", ov).eval()  # the networks the workflows built, with the same overrides
    unet.load_state_dict(torch.load(models / "model_ema.pt", weights_only=True))
    ts_unet = torch.jit.load(str(tmp / "unet.ts"))
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([7, 640])
    packed = torch.cat([x, t.float().view(2, 1, 1, 1, 1).expand(2, 1, 8, 8, 8)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ts_unet(packed), unet(x, timesteps=t), atol=1e-4, rtol=1e-4)

    ae = config_network("autoencoder_def", ov).eval()
    ae.load_state_dict(torch.load(models / "model_autoencoder.pt", weights_only=True))
    scale = json.loads((models / "model_record.json").read_text())["scale_factor"]
    z = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        exported = torch.jit.load(str(tmp / "decoder.ts"))(z)
        torch.testing.assert_close(exported, ae.decode(z / scale), atol=1e-4, rtol=1e-4)
