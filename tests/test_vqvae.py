"""VQ-VAE as stage 1 (configs/vqvae.json): the adapter interface, codebook usage and dead-code re-initialisation,
and a tiny VQ-VAE stage 1 -> reconstruction -> stage 2 -> generation -> decoder export through `monai.bundle`."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import torch
from ignite.engine import Engine
from monai.networks.nets import VQVAE
from monai.utils import set_determinism

from scripts.autoencoders import (
    KLAutoencoderAdapter,
    VQAutoencoderAdapter,
    adapt,
    check_spatial_size,
    downsample_factor,
)
from scripts.handlers import CodebookUsage
from scripts.losses import AutoencoderLoss
from tests.helpers import COMMON, TINY, config_network, overrides_for, run_bundle

VQ_TRAIN = [COMMON, "configs/train_autoencoder.json", "configs/vqvae.json"]
VQ_RECON = [COMMON, "configs/inference_autoencoder.json", "configs/vqvae.json"]
VQ_STAGE2 = [COMMON, "configs/train_diffusion.json", "configs/vqvae.json"]
VQ_GENERATE = [COMMON, "configs/inference.json", "configs/vqvae.json"]
TINY_VQ = {"vq_channels": [8, 8], "vq_num_embeddings": 16}
CODEBOOK = "quantizer.quantizer.embedding.weight"  # state-dict key of the VQVAE's codebook


def tiny_vqvae(levels: int = 2, num_embeddings: int = 16) -> VQVAE:
    """The VQVAE of configs/vqvae.json with 8 channels per level (embedding size: latent_channels, 4)."""
    return config_network("autoencoder_def", {"vq_channels": [8] * levels, "vq_num_embeddings": num_embeddings},
                          configs=("configs/common.json", "configs/vqvae.json"))


def _is_codebook_vector(latent: torch.Tensor, codebook: torch.Tensor) -> bool:
    flat = latent.movedim(1, -1).reshape(-1, codebook.shape[1])
    distance = torch.cdist(flat, codebook, compute_mode="donot_use_mm_for_euclid_dist")
    return bool((distance.min(dim=1).values < 1e-5).all())


def test_one_adapter_interface_for_kl_and_vq_autoencoders():
    set_determinism(0)
    x = torch.rand(2, 1, 16, 16, 16)
    kl = config_network("autoencoder_def", TINY)  # the AutoencoderKL of configs/common.json, tiny
    vq = tiny_vqvae()
    assert isinstance(adapt(kl), KLAutoencoderAdapter) and isinstance(adapt(vq), VQAutoencoderAdapter)
    loss = AutoencoderLoss(kl_weight=0.5, quantization_weight=2.0)
    for net, name, weight in ((kl, "kl", 0.5), (vq, "quantization", 2.0)):
        recon, regularisers = adapt(net)(x)
        assert recon.shape == x.shape and set(regularisers) == {name}
        terms = loss.generator_terms(recon, x, regularisers)
        assert set(terms) == {"recon", name}
        assert float(terms[name]) == pytest.approx(weight * float(regularisers[name]), rel=1e-5)

    # VQ latents for stage 2 are quantised embeddings with zero spread; reading them never moves the codebook
    vq.train()
    codebook = vq.quantizer.quantizer.embedding.weight.detach().clone()
    z_mu, z_sigma = adapt(vq).posterior(x)
    recon = adapt(vq).reconstruction_network()(x)
    assert z_mu.shape == (2, 4, 4, 4, 4) and float(z_sigma.abs().max()) == 0.0 and recon.shape == x.shape
    assert torch.equal(vq.quantizer.quantizer.embedding.weight, codebook)
    assert _is_codebook_vector(z_mu, codebook)

    # the downsampling factor of a VQVAE is the product of its strides (one per level)
    assert downsample_factor(tiny_vqvae(levels=3)) == 8 and downsample_factor(vq) == 4
    with pytest.raises(ValueError, match=r"volume_size=\[20, 16, 16\] is not divisible .* factor 8"):
        check_spatial_size([20, 16, 16], tiny_vqvae(levels=3), "volume_size")
    with pytest.raises(KeyError, match="no weight for the latent regulariser 'other'"):
        loss.generator_terms(x, x, {"other": torch.zeros(())})


def test_dead_codes_are_counted_logged_and_reinitialised_from_encoder_outputs():
    set_determinism(0)
    vq = tiny_vqvae().train()
    quantizer = vq.quantizer.quantizer
    forced = torch.arange(4)
    with torch.no_grad():  # move four codes (and their EMA state) far from any encoder output: never picked
        quantizer.ema_w[forced] = 1e3
        quantizer.ema_cluster_size[forced] = 1.0
        quantizer.embedding.weight[forced] = 1e3
    images = torch.rand(2, 1, 16, 16, 16)
    adapter = adapt(vq)

    def step(engine, batch):
        recon, _ = adapter(batch)
        return {"image": batch, "pred": recon}

    engine = Engine(step)
    usage = CodebookUsage(vq, dead_code_threshold=0, reinit_dead_codes=True)
    usage.attach(engine)
    engine.run([images, images], max_epochs=1)
    first = usage.history[0]
    assert first["epoch"] == 1 and first["codebook_dead_codes"] >= len(forced)
    assert first["codebook_reinitialised"] == first["codebook_dead_codes"] and 1.0 <= first["codebook_perplexity"] <= 16
    assert engine.state.metrics["codebook_dead_codes"] == first["codebook_dead_codes"]
    # the forced codes now sit on encoder outputs of the batch (nothing trains the encoder here) ...
    with torch.no_grad():
        encoded = vq.encode(images)
    distance = torch.cdist(quantizer.embedding.weight[forced], encoded.movedim(1, -1).reshape(-1, 4),
                           compute_mode="donot_use_mm_for_euclid_dist")
    assert (distance.min(dim=1).values < 1e-5).all()
    # ... so they win vectors in the next window
    engine.run([images, images], max_epochs=2)
    assert usage.history[1]["codebook_dead_codes"] < first["codebook_dead_codes"]

    # a KL autoencoder has no codebook: the handler attaches nothing
    kl_engine = Engine(lambda e, b: None)
    CodebookUsage(torch.nn.Conv3d(1, 1, 1)).attach(kl_engine)
    kl_engine.run([0], max_epochs=1)
    assert "codebook_dead_codes" not in kl_engine.state.metrics


@pytest.fixture(scope="module")
def vq_trained(tmp_path_factory):
    """A tiny VQ-VAE stage 1 (2 epochs; the overlay switches dead-code re-initialisation on) and a tiny stage 2 on
    its latents."""
    tmp = tmp_path_factory.mktemp("vqvae")
    stage1 = run_bundle(VQ_TRAIN, overrides_for(tmp, max_epochs=2, val_interval=2, lr=1e-3, adversarial_weight=0.01,
                                                adversarial_warmup_epochs=1,
                                                **TINY_VQ))
    stage2 = run_bundle(VQ_STAGE2, overrides_for(tmp, stage2=True, max_epochs=2, val_interval=2, train_batch_size=2,
                                                 val_batch_size=2, preview_steps=3, preview_num_samples=1,
                                                 lr_warmup_iterations=2, **TINY_VQ))
    return tmp, stage1, stage2


def test_vq_stage1_trains_with_quantisation_loss_and_logs_codebook_usage(vq_trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, stage1, _ = vq_trained
    weights = torch.load(tmp / "models" / "model_autoencoder.pt", weights_only=True)
    assert weights[CODEBOOK].shape == (16, 4)
    run_dir = max((tmp / "outputs").glob("train_autoencoder_*"))
    curves = json.loads((run_dir / "loss_curves.json").read_text())
    assert "quantization" in curves and "kl" not in curves and len(curves["d_loss"]) == 1
    assert "Metrics -- codebook_dead_codes" in stage1.stdout and "codebook_perplexity" in stage1.stdout
    assert "codebook: re-initialised" in stage1.stdout  # configs/vqvae.json switches re-initialisation on
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"codebook_perplexity", "codebook_dead_codes", "codebook_reinitialised"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("codebook_perplexity")] == [1, 2]

    run_bundle(VQ_RECON, overrides_for(tmp, infer=True, **TINY_VQ))
    recon_dir = max((tmp / "outputs").glob("reconstruction_*"))
    assert len(list(recon_dir.glob("*_reconstruction.nii.gz"))) == 2
    assert json.loads((recon_dir / "summary.json").read_text())["psnr"]["mean"] > 0


def test_vq_stage2_and_generation_run_on_quantised_latents(vq_trained):
    tmp, _, stage2 = vq_trained
    checkpoint = torch.load(tmp / "models" / "checkpoint_diffusion.pt", weights_only=True)
    state = checkpoint["record"]  # the training record: latent shape, scale factor, ...
    assert state["latent_shape"] == [4, 8, 8, 8] and checkpoint["engine"]["epoch"] == 2
    assert f"latent scale factor: {round(state['scale_factor'], 5)}" in stage2.stdout
    cache = max((tmp / "cache").glob("latents_training_*.pt"))
    cached = torch.load(cache, weights_only=True)
    codebook = torch.load(tmp / "models" / "model_autoencoder.pt", weights_only=True)[CODEBOOK]
    assert float(cached[0]["z_sigma"].abs().max()) == 0.0 and _is_codebook_vector(cached[0]["z_mu"][None], codebook)

    ov = overrides_for(tmp, generate=True, num_samples=2, sampler="rflow", num_inference_steps=3, **TINY_VQ)
    run_bundle(VQ_GENERATE, ov)
    out = max((tmp / "outputs").glob("generated_*"))
    assert [nib.load(p).shape for p in sorted(out.glob("sample_*.nii.gz"))] == [(32, 32, 32)] * 2

    # the decoder path exports through `monai.bundle ckpt_export` and matches the eager VQVAE (nearest codes, decode)
    run_bundle(VQ_GENERATE, {**ov, "net_id": "export_decoder_def", "filepath": str(tmp / "decoder.ts"),
                             "use_trace": True, "input_shape": [1, 4, 8, 8, 8],
                             "ckpt_file": str(tmp / "models" / "model_autoencoder.pt"),
                             "meta_file": "configs/metadata.json"}, subcommand="ckpt_export")
    ae = tiny_vqvae().eval()
    ae.load_state_dict(torch.load(tmp / "models" / "model_autoencoder.pt", weights_only=True))
    z = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        expected = ae.decode_stage_2_outputs(z / state["scale_factor"])
        torch.testing.assert_close(torch.jit.load(str(tmp / "decoder.ts"))(z), expected, atol=1e-4, rtol=1e-4)
