"""Stage-2 building blocks: latent cache vs on-the-fly encoding, EMA, sampling determinism, decoding."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    RFlowScheduler,
)
from torch import nn

from scripts.autoencoders import latent_spatial_shape
from scripts.diffusion import LatentDiffusionPrepareBatch
from scripts.engines import LatentDiffusionTrainer
from scripts.engines.base import AutocastInferer
from scripts.generation import generate
from scripts.handlers import EMA, EMAUpdate
from scripts.handlers.ema import NUM_UPDATES_KEY
from scripts.latents import PrepareLatents, cache_key, estimate_scale_factor
from scripts.sampling import LatentDiffusionPipeline, decode_latents, initial_noise, sample_latents
from scripts.schedulers import check_sampler
from tests.helpers import TWO_LEVEL_AUTOENCODER, TWO_LEVEL_UNET, config_network


def tiny_autoencoder() -> AutoencoderKL:
    """``autoencoder_def`` with two levels of 4 channels and 2 latent channels (seed 0)."""
    return config_network("autoencoder_def", TWO_LEVEL_AUTOENCODER, seed=0).eval()


def tiny_unet() -> DiffusionModelUNet:
    """``network_def`` with two levels of 8 channels on the 2 latent channels of :func:`tiny_autoencoder` (seed 1)."""
    return config_network("network_def", TWO_LEVEL_UNET, seed=1).eval()


def test_cached_latents_give_the_same_loss_as_on_the_fly_encoding():
    ae, unet = tiny_autoencoder(), tiny_unet()
    images = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(images)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    losses = []
    for batch in ({"z_mu": z_mu, "z_sigma": z_sigma}, {"image": images}):
        trainer = LatentDiffusionTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=unet,
                                         optimizer=torch.optim.SGD(unet.parameters(), lr=0.0),
                                         prepare_batch=LatentDiffusionPrepareBatch(scheduler, 0.7, PrepareLatents(ae)))
        torch.manual_seed(123)  # same latent draw, noise and timesteps
        trainer.run()
        losses.append(trainer.state.output["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_latent_draws_differ_each_iteration():
    """The posterior is sampled per iteration: two iterations on the same cached item see different latents."""
    z_mu, z_sigma = torch.zeros(1, 2, 4, 4, 4), torch.ones(1, 2, 4, 4, 4)
    seen = []

    class Spy(nn.Module):
        def forward(self, x, timesteps, context=None):
            seen.append(x.clone())
            return torch.zeros_like(x, requires_grad=True) * x

    net = Spy()
    net.p = nn.Parameter(torch.zeros(1))
    trainer = LatentDiffusionTrainer(device="cpu", max_epochs=1,
                                     train_data_loader=[{"z_mu": z_mu, "z_sigma": z_sigma}] * 2,
                                     network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                     prepare_batch=LatentDiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=10),
                                                                               1.0))
    trainer.run()
    assert len(seen) == 2 and not torch.allclose(seen[0], seen[1])


@pytest.mark.parametrize("scheduler", [DDPMScheduler(num_train_timesteps=1000), RFlowScheduler(1000)],
                         ids=["ddpm", "rflow"])
def test_keyed_draws_follow_the_item_not_its_batch(scheduler):
    """With sample_seed, each item's posterior sample, noise and timestep depend only on (seed, epoch, its index):
    the same in a batch of 3 as alone (what makes a run independent of the number of processes), new each epoch,
    and a batch without sample_index is refused with the fix."""
    from scripts.randomness import SAMPLE_INDEX

    z_mu, z_sigma = torch.randn(3, 2, 4, 4, 4), torch.rand(3, 2, 4, 4, 4)
    prepare = LatentDiffusionPrepareBatch(scheduler, 0.5, sample_seed=7)

    def draws(rows):
        latents, _, _, kwargs = prepare({"z_mu": z_mu[rows], "z_sigma": z_sigma[rows],
                                         SAMPLE_INDEX: torch.tensor(rows)})
        return latents, kwargs["noise"], kwargs["timesteps"]

    together = draws([0, 1, 2])
    torch.manual_seed(99)  # the global RNG plays no part
    apart = [draws([i]) for i in (2, 0, 1)]
    for k in range(3):
        torch.testing.assert_close(torch.cat([apart[1][k], apart[2][k], apart[0][k]]), together[k], rtol=0, atol=0)
    assert len(set(together[2].tolist())) > 1 and not torch.allclose(together[1][0], together[1][1])
    prepare.set_epoch(1)
    assert not torch.allclose(draws([0, 1, 2])[1], together[1])
    with pytest.raises(KeyError, match="sample_index.*set the seed to null"):
        prepare({"z_mu": z_mu, "z_sigma": z_sigma})


def test_scale_factor_is_one_over_std_of_all_latents():
    items = [{"z_mu": torch.randn(2, 4, 4, 4) * 3.0, "z_sigma": torch.full((2, 4, 4, 4), 1e-4)} for _ in range(20)]
    assert estimate_scale_factor(items) == pytest.approx(1 / 3.0, rel=0.05)
    assert estimate_scale_factor(items, seed=0) == estimate_scale_factor(items, seed=0)


def test_ema_update_follows_formula():
    net = nn.Linear(3, 1)
    ema = EMA(net, decay=0.9, warmup=False)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * net.weight.detach())
    assert set(ema.state_dict()) == set(net.state_dict()) | {NUM_UPDATES_KEY}


def test_ema_warmup_forgets_the_initial_weights_and_resumes_its_count(tmp_path):
    """With the warm-up, step n uses min(decay, (1+n)/(10+n)): after 800 steps at decay 0.995 the initial weights
    keep a share below 1e-6 instead of 0.995**800 = 1.8 %."""
    net = nn.Linear(3, 1)
    ema, plain = EMA(net, decay=0.995), EMA(net, decay=0.995, warmup=False)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        net.weight.zero_()
        ema.module.weight.fill_(1.0)
        plain.module.weight.fill_(1.0)
    for _ in range(800):
        ema.update()
        plain.update()
    assert float(ema.module.weight.abs().max()) < 1e-6  # the share of the initial weights (1.0)
    assert float(plain.module.weight.max()) == pytest.approx(0.995**800, rel=1e-3)
    restored = EMA(net, decay=0.995)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 800 and restored.current_decay() == ema.current_decay()
    # the weight file written beside the checkpoint is the plain network state dict
    from scripts.handlers.checkpoint import _plain_weights

    assert set(_plain_weights(ema, ema.state_dict())) == set(net.state_dict())


def test_ema_updates_once_per_optimiser_step_on_model_completed():
    """EMAUpdate listens to IterationEvents.MODEL_COMPLETED, which the trainer fires after each optimiser step:
    4 iterations with 2-step gradient accumulation make 2 steps and 2 EMA updates, and the events fire in order."""
    from monai.engines.utils import IterationEvents

    unet = tiny_unet()
    ema = EMA(unet, decay=0.5, warmup=False)
    batch = {"z_mu": torch.randn(1, 2, 8, 8, 8), "z_sigma": torch.zeros(1, 2, 8, 8, 8)}
    trainer = LatentDiffusionTrainer(device="cpu", max_epochs=1, train_data_loader=[batch] * 4, network=unet,
                                     optimizer=torch.optim.SGD(unet.parameters(), lr=0.1),
                                     prepare_batch=LatentDiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=10),
                                                                               1.0),
                                     accumulation_steps=2, train_handlers=[EMAUpdate(ema)])
    fired = []
    for event in IterationEvents:
        trainer.add_event_handler(event, lambda e, ev=event: fired.append(ev.name))
    trainer.run()
    assert ema.num_updates == 2
    assert fired[:4] == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "FORWARD_COMPLETED"]
    assert fired.count("MODEL_COMPLETED") == 2 and fired.count("BACKWARD_COMPLETED") == 4


def test_prepare_batch_carries_a_condition_into_the_inferer():
    """The condition slot: datalist fields named by condition_name reach the network as DiffusionInferer's
    cross-attention context; a missing field fails with one line naming it."""
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, x, timesteps, context=None):
            seen["context"] = context
            return x * self.p

    batch = {"z_mu": torch.zeros(2, 2, 4, 4, 4), "z_sigma": torch.ones(2, 2, 4, 4, 4),
             "age": torch.tensor([60.0, 70.0]), "lesions": torch.tensor([1, 3])}
    objective = LatentDiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0,
                                            condition_name=["age", "lesions"])
    net = Spy()
    trainer = LatentDiffusionTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net,
                                     optimizer=torch.optim.SGD(net.parameters(), lr=0.0), prepare_batch=objective)
    trainer.run()
    torch.testing.assert_close(seen["context"], torch.tensor([[60.0, 1.0], [70.0, 3.0]]))
    with pytest.raises(KeyError, match="condition_name names \\['sex'\\]"):
        LatentDiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, condition_name=["sex"])(batch)


def test_validation_objective_is_fixed_by_its_generator():
    objective = LatentDiffusionPrepareBatch(RFlowScheduler(num_train_timesteps=100, use_discrete_timesteps=False), 0.5)
    batch = {"z_mu": torch.randn(2, 2, 4, 4, 4), "z_sigma": torch.ones(2, 2, 4, 4, 4)}
    first = objective(batch, generator=torch.Generator().manual_seed(3))
    again = objective(batch, generator=torch.Generator().manual_seed(3))
    for a, b in zip([first[0], first[1], first[3]["noise"], first[3]["timesteps"]],
                    [again[0], again[1], again[3]["noise"], again[3]["timesteps"]], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(first[1], first[0] - first[3]["noise"])  # the rectified-flow target


def test_cache_key_changes_with_autoencoder_weights_and_transform(tmp_path):
    from monai.transforms import Compose, ScaleIntensityRanged

    items = [{"image": "a.nii.gz"}]
    path = tmp_path / "ae.pt"
    torch.save({"w": torch.zeros(2)}, path)
    t1 = Compose([ScaleIntensityRanged("image", a_min=0, a_max=1, b_min=0, b_max=1)])
    t2 = Compose([ScaleIntensityRanged("image", a_min=0, a_max=2, b_min=0, b_max=1)])
    key = cache_key(str(path), t1, items)
    assert key == cache_key(str(path), t1, items)
    assert key != cache_key(str(path), t2, items)
    torch.save({"w": torch.ones(2)}, path)
    assert key != cache_key(str(path), t1, items)


@pytest.mark.parametrize("scheduler", [DDPMScheduler(num_train_timesteps=50), DDIMScheduler(num_train_timesteps=50),
                                       PNDMScheduler(num_train_timesteps=50, skip_prk_steps=True),
                                       RFlowScheduler(num_train_timesteps=50, use_discrete_timesteps=False)],
                         ids=["ddpm", "ddim", "pndm", "rflow"])
def test_sampler_runs_the_requested_steps(scheduler):
    calls = []
    unet = tiny_unet()

    def counting(x, timesteps):
        calls.append(timesteps)
        return unet(x, timesteps=timesteps)

    out = sample_latents(counting, scheduler, torch.randn(1, 2, 4, 4, 4), num_inference_steps=7, progress=False)
    assert out.shape == (1, 2, 4, 4, 4) and torch.isfinite(out).all()
    assert len(calls) == 7


@pytest.mark.parametrize("make", [lambda: DDPMScheduler(num_train_timesteps=20),
                                  lambda: DDIMScheduler(num_train_timesteps=20)], ids=["ddpm", "ddim"])
def test_sample_depends_on_seed_and_index_not_batch_size(make, tmp_path):
    ae, unet = tiny_autoencoder(), tiny_unet()
    common = {"latent_shape": [2, 4, 4, 4], "spacing": [2.0, 2.0, 2.0], "num_samples": 3, "seed": 5,
              "progress": False}
    runs = [generate(LatentDiffusionPipeline(unet, make(), ae, 1.0, num_inference_steps=4), output_dir=str(tmp_path),
                     batch_size=b, **common) for b in (1, 3)]
    import nibabel as nib

    for i in range(3):
        a, b = (nib.load(r / f"sample_{i:04d}.nii.gz").get_fdata() for r in runs)
        assert abs(a - b).max() < 1e-5
    first = nib.load(runs[0] / "sample_0000.nii.gz").get_fdata()
    assert abs(first - nib.load(runs[0] / "sample_0001.nii.gz").get_fdata()).max() > 1e-4
    assert runs[0] != runs[1], "a second run writes a new folder"


def test_generation_draws_the_samples_of_its_dataset(tmp_path):
    """The workflow's dataset (index, seed items) chooses the samples: item {index 2, seed 5} is sample 2 of a
    seed-5 run."""
    import nibabel as nib

    common = {"pipeline": LatentDiffusionPipeline(tiny_unet(), DDIMScheduler(num_train_timesteps=20),
                                                  tiny_autoencoder(), 1.0, num_inference_steps=3),
              "latent_shape": [2, 4, 4, 4], "spacing": [2.0, 2.0, 2.0], "progress": False}
    full = generate(output_dir=str(tmp_path / "a"), num_samples=3, seed=5, **common)
    picked = generate(output_dir=str(tmp_path / "b"), samples=[{"index": 2, "seed": 5}], **common)
    assert sorted(p.name for p in picked.glob("*.nii.gz")) == ["sample_0002.nii.gz"]
    a, b = (nib.load(r / "sample_0002.nii.gz").get_fdata() for r in (full, picked))
    assert abs(a - b).max() < 1e-6


def test_generation_amp_autocasts_the_unet_and_decoder(tmp_path):
    import nibabel as nib

    unet, ae = tiny_unet(), tiny_autoencoder()
    common = {"latent_shape": [2, 4, 4, 4], "spacing": [2.0, 2.0, 2.0], "num_samples": 1, "progress": False}
    plain, autocast = (generate(LatentDiffusionPipeline(unet, DDIMScheduler(num_train_timesteps=20), ae, 1.0,
                                                        num_inference_steps=3, amp=amp),
                                output_dir=str(tmp_path / str(amp)), **common) for amp in (False, True))
    a, b = (nib.load(r / "sample_0000.nii.gz") for r in (plain, autocast))
    assert b.get_data_dtype() == a.get_data_dtype() == "float32"
    assert abs(a.get_fdata() - b.get_fdata()).max() > 1e-4


def test_autocast_inferer_runs_the_network_in_low_precision_and_returns_float32():
    ae = tiny_autoencoder()
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        plain = AutocastInferer(amp=False)(x, ae.reconstruct)
        autocast = AutocastInferer(amp=True)(x, ae.reconstruct)
    assert plain.dtype == autocast.dtype == torch.float32
    assert (plain - autocast).abs().max() > 1e-4


def test_initial_noise_is_per_index():
    a = initial_noise([2, 3, 3, 3], [0, 1, 2], seed=1, device="cpu")
    b = initial_noise([2, 3, 3, 3], [2], seed=1, device="cpu")
    torch.testing.assert_close(a[2:], b)


def test_decode_divides_by_scale_factor():
    ae = tiny_autoencoder()
    z = torch.randn(1, 2, 4, 4, 4)
    with torch.no_grad():
        expected = ae.decode(z / 0.25)
    torch.testing.assert_close(decode_latents(ae, z, 0.25), expected)
    assert not torch.allclose(decode_latents(ae, z, 1.0), expected)


def test_tiled_decode_matches_full_decode():
    ae = tiny_autoencoder()
    z = torch.randn(1, 2, 8, 8, 8)
    full = decode_latents(ae, z, 0.5)
    one_tile = decode_latents(ae, z, 0.5, SlidingWindowInferer(roi_size=[8, 8, 8], sw_batch_size=1))
    torch.testing.assert_close(one_tile, full)
    tiles = SlidingWindowInferer(roi_size=[6, 6, 6], sw_batch_size=1, overlap=0.5, mode="gaussian")
    tiled = decode_latents(ae, z, 0.5, tiles)
    assert tiled.shape == full.shape == (1, 1, 16, 16, 16)
    # GroupNorm statistics are per tile, so several tiles only approximate the full decode
    correlation = torch.corrcoef(torch.stack([tiled.flatten(), full.flatten()]))[0, 1]
    assert correlation > 0.9, correlation


def test_latent_shape_errors_name_the_key():
    with pytest.raises(ValueError,
                       match=r"image_size=\[31, 32, 32\] is not divisible by the autoencoder's downsampling factor 2"):
        latent_spatial_shape([31, 32, 32], tiny_autoencoder(), "image_size")


def test_sampler_must_match_training_family():
    check_sampler("ddim", "ddpm")
    check_sampler("rflow", "rflow")
    with pytest.raises(ValueError, match="use --sampler rflow"):
        check_sampler("ddim", "rflow")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_prediction_types_train(prediction_type):
    unet = tiny_unet()
    trainer = LatentDiffusionTrainer(device="cpu", max_epochs=1, train_data_loader=[{"z_mu": torch.randn(2, 2, 4, 4, 4),
                                     "z_sigma": torch.full((2, 2, 4, 4, 4), 0.1)}], network=unet,
                                     optimizer=torch.optim.Adam(unet.parameters(), 1e-3),
                                     prepare_batch=LatentDiffusionPrepareBatch(
                                         DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type), 1.0))
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])


def test_rectified_flow_trains_on_the_velocity_target():
    from scripts.diffusion import diffusion_target, sample_timesteps

    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, sample_method="logit-normal",
                               use_timestep_transform=True, base_img_size_numel=64, spatial_dim=3)
    x0, noise = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    t = sample_timesteps(scheduler, x0, torch.Generator().manual_seed(0))
    assert t.shape == (3,) and float(t.min()) >= 0 and float(t.max()) <= 1000
    torch.testing.assert_close(sample_timesteps(scheduler, x0, torch.Generator().manual_seed(0)), t)
    torch.testing.assert_close(diffusion_target(scheduler, x0, noise, t), x0 - noise)
    unet = tiny_unet()
    trainer = LatentDiffusionTrainer(device="cpu", max_epochs=2,
                                     train_data_loader=[{"z_mu": x0, "z_sigma": torch.full_like(x0, 0.1)}],
                                     network=unet, optimizer=torch.optim.Adam(unet.parameters(), 1e-3),
                                     prepare_batch=LatentDiffusionPrepareBatch(scheduler, 1.0))
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])


def test_scale_factor_is_applied_once_each_way():
    """Training multiplies the latent by the scale factor once, decoding divides once: decoding the latent the
    diffusion model is trained on gives the plain reconstruction."""
    ae = tiny_autoencoder()
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        z_mu, _ = ae.encode(image)
        reconstruction = ae.decode(z_mu)
    seen = []

    def inferer(inputs, diffusion_model, noise, timesteps):
        seen.append(inputs)
        return torch.zeros_like(inputs, requires_grad=True)

    net = nn.Linear(1, 1)
    trainer = LatentDiffusionTrainer(device="cpu", max_epochs=1, network=net,
                                     optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                     train_data_loader=[{"z_mu": z_mu, "z_sigma": torch.zeros_like(z_mu)}],
                                     prepare_batch=LatentDiffusionPrepareBatch(DDPMScheduler(num_train_timesteps=10),
                                                                               0.3),
                                     inferer=inferer)
    trainer.run()
    torch.testing.assert_close(seen[0], z_mu * 0.3)
    torch.testing.assert_close(decode_latents(ae, seen[0], 0.3), reconstruction, atol=1e-5, rtol=1e-5)


def test_model_best_keeps_the_lowest_validation_loss_and_its_score_survives_resume(tmp_path):
    """The validation ``BestWeights`` of configs/train_diffusion.json, driven by rounds of falling then rising loss;
    a new handler given the saved state (a resumed run) replaces the file only with a better round."""
    from ignite.engine import Engine, Events
    from monai.bundle import ConfigParser

    from scripts.engines import lower_is_better
    from scripts.handlers import BestWeights
    from tests.helpers import ROOT

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train_diffusion.json"))
    assert parser.get("validate#best_weights#_target_") == "scripts.handlers.BestWeights"
    assert "@validate#best_weights" in parser.get("validate#handlers")
    filename = parser.get("validate#best_weights#filename")
    net = nn.Linear(1, 1)

    def validate(handler, losses, first_round=0):
        rounds = iter(enumerate(losses, first_round))
        evaluator = Engine(lambda engine, batch: None)
        evaluator.metric_cmp_fn = lower_is_better  # what LatentDiffusionEvaluator is given

        @evaluator.on(Events.EPOCH_COMPLETED)
        def score(engine):  # what LatentDiffusionEvaluator's Average metric reports, before the handler runs
            i, loss = next(rounds)
            engine.state.key_metric_name = "val_loss"
            engine.state.metrics = {"val_loss": loss}
            with torch.no_grad():
                net.weight.fill_(i)  # the weights of round i

        handler.attach(evaluator)
        for _ in losses:
            evaluator.run([0])

    first = BestWeights(str(tmp_path), net, filename)
    validate(first, [0.5, 0.2, 0.4, 0.3])
    assert float(torch.load(tmp_path / filename, weights_only=True)["weight"]) == 1
    resumed = BestWeights(str(tmp_path), net, filename)
    resumed.load_state_dict(first.state_dict())
    validate(resumed, [0.25, 0.1], first_round=4)  # 0.25 is worse than 0.2 of round 1: kept; 0.1 is better
    assert float(torch.load(tmp_path / filename, weights_only=True)["weight"]) == 5
    assert resumed.state_dict() == {"best_score": 0.1, "best_epoch": 1}
