"""Exact resume: 2 epochs, stop, resume for 1 more equals 3 uninterrupted epochs, in both stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import COMMON, overrides_for, run_bundle

STAGE1 = [COMMON, "configs/train_autoencoder.json"]
STAGE2 = [COMMON, "configs/train_diffusion.json"]
#: largest absolute difference allowed between a resumed and an uninterrupted run (CPU, float32: measured 0)
TOLERANCE = 1e-6


def _tensors(obj, prefix=""):
    """Every tensor and number of a (nested) checkpoint state, by its path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, torch.tensor(float(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def assert_same_state(resumed: Path, uninterrupted: Path, keys: set[str]) -> float:
    """The two checkpoints hold the same ``keys`` (networks, optimiser moments, schedules, EMA, scaler, random
    states, best score) within :data:`TOLERANCE`; returns the largest difference."""
    a = torch.load(resumed, weights_only=True)
    b = torch.load(uninterrupted, weights_only=True)
    assert keys <= set(a), sorted(a)
    assert a["engine"] == b["engine"]
    worst = 0.0
    for key in sorted(keys):
        left, right = dict(_tensors(a[key])), dict(_tensors(b[key]))
        assert left.keys() == right.keys(), key
        for path, value in left.items():
            diff = float((value.double() - right[path].double()).abs().max()) if value.numel() else 0.0
            assert diff <= TOLERANCE, f"{key}{path} differs by {diff}"
            worst = max(worst, diff)
    return worst


def _stage(tmp: Path, name: str, **extra) -> dict:
    return overrides_for(tmp, ckpt_dir=str(tmp / name / "models"), output_dir=str(tmp / name / "outputs"), amp=False,
                         **extra)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 trained for 3 epochs at once, and for 2 then resumed for 1 (adversarial from epoch 2, validation
    and best model at epoch 2, a cosine schedule over 3 epochs)."""
    tmp = tmp_path_factory.mktemp("resume1")
    settings = dict(val_interval=2, save_interval=1, train_batch_size=2, adversarial_weight=0.01,
                    adversarial_warmup_epochs=1, **{"g_lr_scheduler#T_max": 3})
    run_bundle(STAGE1, _stage(tmp, "once", max_epochs=3, **settings))
    run_bundle(STAGE1, _stage(tmp, "resumed", max_epochs=2, **settings))
    proc = run_bundle(STAGE1, _stage(tmp, "resumed", max_epochs=3, resume=True, **settings))
    return tmp, proc


def test_stage1_resume_equals_an_uninterrupted_run(stage1):
    tmp, proc = stage1
    assert "resumed from" in proc.stdout and "fresh random draws" not in proc.stdout
    keys = {"autoencoder", "discriminator", "g_optimizer", "d_optimizer", "g_lr_scheduler", "g_step", "d_step",
            "best_weights", "rng"}
    worst = assert_same_state(tmp / "resumed" / "models" / "checkpoint_autoencoder.pt",
                              tmp / "once" / "models" / "checkpoint_autoencoder.pt", keys)
    print(f"stage 1: largest difference resumed vs uninterrupted {worst:.3g}")
    for name in ("model_autoencoder.pt", "model_autoencoder_best.pt"):
        resumed = torch.load(tmp / "resumed" / "models" / name, weights_only=True)
        once = torch.load(tmp / "once" / "models" / name, weights_only=True)
        assert all(torch.allclose(resumed[k], once[k], atol=TOLERANCE, rtol=0) for k in once), name


def test_stage2_resume_equals_an_uninterrupted_run(stage1):
    tmp, _ = stage1
    settings = dict(val_interval=100, save_interval=1, preview_num_samples=0, train_batch_size=2,
                    load_autoencoder_path=str(tmp / "once" / "models" / "model_autoencoder.pt"))
    run_bundle(STAGE2, _stage(tmp, "once", stage2=True, max_epochs=3, **settings))
    run_bundle(STAGE2, _stage(tmp, "resumed", stage2=True, max_epochs=2, **settings))
    proc = run_bundle(STAGE2, _stage(tmp, "resumed", stage2=True, max_epochs=3, resume=True, **settings))
    assert "resumed from" in proc.stdout and "fresh random draws" not in proc.stdout
    keys = {"diffusion", "ema", "optimizer", "lr_scheduler", "step", "best_weights", "rng"}
    worst = assert_same_state(tmp / "resumed" / "models" / "checkpoint_diffusion.pt",
                              tmp / "once" / "models" / "checkpoint_diffusion.pt", keys)
    print(f"stage 2: largest difference resumed vs uninterrupted {worst:.3g}")


def test_best_score_survives_resume(stage1):
    """The best score of the interrupted run is restored, not reset (that a resumed run's validation then replaces
    the best model only with a better score: test_stage2_units)."""
    tmp, _ = stage1
    once = torch.load(tmp / "once" / "models" / "checkpoint_autoencoder.pt", weights_only=True)["best_weights"]
    resumed = torch.load(tmp / "resumed" / "models" / "checkpoint_autoencoder.pt", weights_only=True)["best_weights"]
    assert resumed == once and once["best_score"] is not None and once["best_epoch"] == 2


@pytest.mark.parametrize("iteration, completed", [(6, 2), (4, 1)])
def test_sigterm_on_an_epoch_boundary_or_mid_epoch_records_the_completed_epochs(tmp_path, iteration, completed):
    """SIGTERM during the last iteration of epoch 2 saves 2 completed epochs; during the first of epoch 2, 1."""
    import os
    import signal

    from ignite.engine import Events

    from scripts.engines import AutoencoderTrainer
    from scripts.handlers import TrainingCheckpoint
    from scripts.losses import AutoencoderLoss
    from tests.helpers import TWO_LEVEL_AUTOENCODER, config_network

    ae = config_network("autoencoder_def", TWO_LEVEL_AUTOENCODER, seed=0)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ckpt = TrainingCheckpoint(str(tmp_path), {"autoencoder": ae, "g_optimizer": opt}, save_interval=0)
        trainer = AutoencoderTrainer(device="cpu", max_epochs=5, g_network=ae, g_optimizer=opt,
                                     train_data_loader=[{"image": torch.rand(1, 1, 16, 16, 16)}] * 3,
                                     loss_function=AutoencoderLoss(), train_handlers=[ckpt])
        trainer.add_event_handler(Events.ITERATION_STARTED(once=iteration),
                                  lambda _: os.kill(os.getpid(), signal.SIGTERM))
        trainer.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        TrainingCheckpoint.stopped_by = None
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["engine"]
    assert saved == {"epoch": completed, "iteration": iteration, "epoch_length": 3}
