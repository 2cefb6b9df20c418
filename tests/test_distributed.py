"""Data-parallel training under torchrun on CPU (Gloo): the multi-GPU overlays, rank-0 writing, lr scaling."""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket

import pytest
import torch

from scripts import distributed
from tests.helpers import COMMON, TINY, TINY_DIFFUSION, config_network, overrides_for, run_bundle, torchrun

STAGE1 = [COMMON, "configs/train_autoencoder.json", "configs/multi_gpu_train_autoencoder.json"]
PROBE = "$list(@train#handlers) + [monai.utils.instantiate('tests.rank_probe.SeenItems', 'default', folder='{folder}')]"


@pytest.fixture(scope="module")
def ddp_stage1(tmp_path_factory):
    """Two Gloo processes train the tiny autoencoder for 2 epochs, with gradient accumulation."""
    tmp = tmp_path_factory.mktemp("ddp1")
    overrides = overrides_for(tmp, max_epochs=2, val_interval=1, save_interval=1, train_batch_size=1,
                              gradient_accumulation_steps=2, adversarial_weight=0.01, adversarial_warmup_epochs=0,
                              **{"train#trainer#train_handlers": PROBE.format(folder=tmp / "seen")})
    proc = run_bundle(STAGE1, overrides, launcher=torchrun(2), timeout=900)
    return tmp, proc


def test_two_processes_train_once_on_disjoint_data(ddp_stage1):
    tmp, proc = ddp_stage1
    # one set of checkpoints and one run folder: only rank 0 writes
    assert sorted(p.name for p in (tmp / "models").iterdir()) == [
        "checkpoint_autoencoder.pt", "model_autoencoder.pt", "model_autoencoder_best.pt"]
    runs = list((tmp / "outputs").iterdir())
    assert len(runs) == 1 and (runs[0] / "loss_curves.png").is_file()
    assert len(list(runs[0].glob("previews/*.png"))) == 2
    # each rank drew its own half of the 6 training volumes in each epoch
    seen = [json.loads((tmp / "seen" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["epochs"] == 2 for s in seen)
    per_epoch = [set(s["seen"][:3]) for s in seen]
    assert len(per_epoch[0]) == len(per_epoch[1]) == 3 and not per_epoch[0] & per_epoch[1]
    # finite losses, logged once
    curves = json.loads((runs[0] / "loss_curves.json").read_text())
    assert curves["g_loss"] and all(math.isfinite(v) for _, v in curves["g_loss"])
    assert proc.stdout.count("stage 1 finished") == 1


def test_scaled_learning_rate_in_checkpoint(ddp_stage1):
    tmp, proc = ddp_stage1
    state = torch.load(tmp / "models" / "checkpoint_autoencoder.pt", weights_only=True)
    expected = 0.00025 * 2 * 1 * 2  # base_learning_rate x world size x batch size x accumulation
    group = state["g_optimizer"]["param_groups"][0]
    # the cosine decay starts from the scaled rate and ends, after max_epochs, at lr_min_factor (0.01) of it
    assert group["initial_lr"] == pytest.approx(expected) and group["lr"] == pytest.approx(0.01 * expected)
    assert state["d_optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)
    assert "world size 2 x batch size 1 x gradient accumulation 2" in proc.stdout
    assert state["engine"]["epoch"] == 2 and state["engine"]["iteration"] == 6  # 3 iterations per rank per epoch


def test_validation_metric_is_reduced_over_both_ranks(ddp_stage1, tmp_path):
    """Each rank validates one of the 2 validation volumes; the logged PSNR is the mean over both, as a
    single-process reconstruction of the validation split with the final weights measures it."""
    tmp, proc = ddp_stage1
    logged = re.findall(r"Epoch\[2\] Metrics -- .*?val_psnr: ([0-9.]+)", proc.stdout + proc.stderr)
    assert len(logged) == 1  # rank 0 logs, once
    # written outside the fixture's folder, whose single run folder another test counts
    run_bundle([COMMON, "configs/inference_autoencoder.json"],
               overrides_for(tmp, infer=True, split="validation", output_dir=str(tmp_path / "outputs")))
    summary = json.loads(next((tmp_path / "outputs").glob("reconstruction_*/summary.json")).read_text())
    assert summary["num_volumes"] == 2
    assert float(logged[0]) == pytest.approx(summary["psnr"]["mean"], abs=1e-3)


def test_scaled_lr_formula_and_switch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.scaled_lr(1e-4, batch_size=2, accumulation_steps=3) == pytest.approx(1e-4 * 4 * 2 * 3)
    assert "world size 4 x batch size 2 x gradient accumulation 3" in capsys.readouterr().out
    assert distributed.scaled_lr(1e-4, batch_size=2, accumulation_steps=3, scale=False) == 1e-4
    assert "not scaled" in capsys.readouterr().out


def test_rank_facts_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.rank() == 1 and distributed.world_size() == 2 and not distributed.is_main_rank()
    from scripts.storage import new_run_dir

    monkeypatch.chdir("/")
    path = new_run_dir("/nonexistent-parent", "train_autoencoder")
    assert path.name.endswith("_rank1") and not path.exists()  # ranks > 0 create nothing


def test_overlay_without_torchrun_names_the_fix(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        distributed.init_process_group()


@contextlib.contextmanager
def world_of_one(monkeypatch):
    """A torchrun world of one process, in the forked test process (no torchrun start-up): the overlays' sampler and
    process group at world size 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        yield
    finally:
        for key in env:
            monkeypatch.delenv(key)


#: largest difference allowed between the weights of equivalent runs (float32 sums in another order)
EQUIVALENCE_TOLERANCE = 1e-5
def assert_equivalent_runs(run, monkeypatch, initial, networks, step_key, epochs):
    """``run(name, launcher=None, **overrides)`` as 1 process x batch 2, 1 process x batch 1 x 2 accumulated steps and
    2 Gloo processes x batch 1: the same optimiser steps, and ``networks`` of each within
    :data:`EQUIVALENCE_TOLERANCE` of the first run's, whose first network moved from ``initial`` by more than 1e-3."""
    with world_of_one(monkeypatch):
        one = run("one", train_batch_size=2)
        accumulated = run("accumulated", train_batch_size=1, gradient_accumulation_steps=2)
    two = run("two", launcher=torchrun(2), train_batch_size=1)
    moved = max(float((one[networks[0]][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3, "the run must move the weights for the comparison to mean anything"
    for other, name in ((two, "2 processes"), (accumulated, "accumulation")):
        assert other["engine"]["epoch"] == epochs and other[step_key] == one[step_key]
        worst = max(float((other[net][k] - one[net][k]).abs().max())
                    for net in networks for k in one[net] if one[net][k].is_floating_point())
        print(f"{networks[0]}, {name} vs 1 process: largest weight difference {worst:.3g} "
              f"(weights moved up to {moved:.3g})")
        assert worst <= EQUIVALENCE_TOLERANCE, f"{name}: {worst}"


POSTERIOR_MEAN = "$list(@train#handlers) + [monai.utils.instantiate('tests.rank_probe.PosteriorMean', 'default')]"


def test_two_processes_and_accumulation_equal_one_process_at_the_same_global_batch(tmp_path, monkeypatch):
    """One stage-1 epoch (adversarial on): 2 Gloo processes x batch 1, and 1 process x batch 1 x 2 accumulated
    steps, end with the weights of 1 process x batch 2: same samples per step (the overlay's sampler, whole-volume
    crops), same learning rate (2 samples per step), the posterior mean decoded (no per-rank noise). Plain SGD, whose
    update is linear in the gradient: Adam divides by the gradient's size, so where a gradient is near zero it turns
    float rounding into a step of up to lr (measured with Adam: median difference 6e-7, largest 7e-4)."""
    def run(name, launcher=None, **extra):
        ov = overrides_for(tmp_path, ckpt_dir=str(tmp_path / name), output_dir=str(tmp_path / "outputs"), max_epochs=1,
                           val_interval=100, save_interval=1, adversarial_weight=0.01, adversarial_warmup_epochs=0,
                           train_patch_size=[32, 32, 32], amp=False, base_learning_rate=0.01,
                           **{"train#trainer#train_handlers": POSTERIOR_MEAN, "goptimizer#_target_": "torch.optim.SGD",
                              "doptimizer#_target_": "torch.optim.SGD"}, **extra)
        run_bundle(STAGE1, ov, launcher=launcher, timeout=900)
        return torch.load(tmp_path / name / "checkpoint_autoencoder.pt", weights_only=True)

    initial = config_network("autoencoder_def", TINY, seed=0).state_dict()  # what seed 0 builds, as the runs did
    assert_equivalent_runs(run, monkeypatch, initial, ("autoencoder", "discriminator"), "g_step", epochs=1)


STAGE2 = [COMMON, "configs/train_diffusion.json", "configs/multi_gpu_train_diffusion.json"]
#: what a torchrun rank prints when it aborts in C++ teardown at exit (a known open defect, issue note of stop 14)
TEARDOWN_ABORT = "terminate called without an active exception"


def test_stage2_two_processes_and_accumulation_equal_one_process_at_the_same_global_batch(ddp_stage1, tmp_path,
                                                                                          monkeypatch):
    """Two stage-2 epochs on the fixture's autoencoder: 2 Gloo processes x batch 1, and 1 process x batch 1 x 2
    accumulated steps, end with the weights (and EMA) of 1 process x batch 2. Each item's posterior sample, noise and
    timestep are keyed by (sample_seed, epoch, its index), so they do not depend on which rank or step draws them;
    the second epoch checks the epoch enters the key. Plain SGD, as in the stage-1 test; gradient clipping on (it
    acts on the summed, all-reduced gradient)."""
    stage1_tmp, _ = ddp_stage1

    def run(name, launcher=None, **extra):
        ov = overrides_for(stage1_tmp, stage2=True, ckpt_dir=str(tmp_path / name), output_dir=str(tmp_path / "outputs"),
                           latent_cache_dir=str(tmp_path / "cache"), max_epochs=2, val_interval=100, save_interval=1,
                           preview_num_samples=0, amp=False, base_learning_rate=0.05, lr_warmup_iterations=1,
                           load_autoencoder_path=str(stage1_tmp / "models" / "model_autoencoder.pt"),
                           **{"optimizer#_target_": "torch.optim.SGD", "optimizer#weight_decay": 0.0}, **extra)
        proc = run_bundle(STAGE2, ov, launcher=launcher, timeout=900, check=launcher is None)
        if proc.returncode != 0:
            # seen once in four runs: a rank aborting in C++ teardown after its last epoch, which the checkpoint's
            # epoch count (checked below) shows complete; any other failure fails here
            assert TEARDOWN_ABORT in proc.stdout + proc.stderr, proc.stderr[-4000:]
        return torch.load(tmp_path / name / "checkpoint_diffusion.pt", weights_only=True)

    initial = config_network("network_def", {**TINY, **TINY_DIFFUSION}, seed=0).state_dict()
    assert_equivalent_runs(run, monkeypatch, initial, ("diffusion", "ema"), "step", epochs=2)
