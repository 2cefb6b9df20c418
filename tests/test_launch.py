"""The LDM-style command line ``main.py``: train with -t, test without it, run folders, aliases, preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import launch
from tests.helpers import ROOT, TINY, TINY_DIFFUSION, run_command, torchrun

MAIN = str(ROOT / "main.py")
STAGE1 = ["--base", "configs/train_autoencoder.json"]  # common.json put first by main.py
STAGE2 = ["--base", "configs/common.json", "configs/train_diffusion.json"]


def tiny(tmp: Path, stage2: bool = False) -> list[str]:
    """Tiny settings as main.py key=value overrides, every file under ``tmp``."""
    values = {**TINY, "dataset_dir": str(tmp / "data"), "demo_data_dir": str(tmp / "data")}
    if stage2:
        values = {**{k: v for k, v in values.items() if k != "train_patch_size"}, **TINY_DIFFUSION,
                  "latent_cache_dir": str(tmp / "cache")}
    return [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in values.items()]


def run_main(args: list[str], cwd: Path, launcher: list[str] | None = None, check: bool = True,
             timeout: int = 900) -> subprocess.CompletedProcess:
    """``python main.py ...`` (or under ``launcher``) from ``cwd``, outside the bundle root as users may."""
    return run_command([*(launcher or [sys.executable]), MAIN, *args], cwd, launcher is not None, check, timeout)


def only_run(logs: Path, name: str) -> Path:
    runs = list(logs.glob(f"*_{name}"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """``python main.py --base train_autoencoder.json -t --name ae``: trains, then reconstructs one test volume."""
    tmp = tmp_path_factory.mktemp("main")
    proc = run_main([*STAGE1, "-t", "--name", "ae", "max_epochs=2", "val_interval=1", "accumulate_grad_batches=2",
                     "limit_test_batches=1", *tiny(tmp)], cwd=tmp)
    return tmp, proc


def test_train_then_test_in_one_run_folder(stage1_run):
    tmp, proc = stage1_run
    run = only_run(tmp / "logs", "ae")
    assert {"configs", "models"} <= {p.name for p in run.iterdir()}
    assert (run / "models" / "model_autoencoder.pt").is_file()
    assert len(list(run.glob("train_autoencoder_*/events.out.tfevents.*"))) >= 1
    assert list(run.glob("train_autoencoder_*/previews/*.png"))
    # the test run reconstructed limit_test_batches=1 volume of the test split into the same run folder
    recon = list(run.glob("reconstruction_*"))
    assert len(recon) == 1 and len(list(recon[0].glob("*_reconstruction.nii.gz"))) == 1
    # the snapshot is the merged config with the overrides, macros resolved
    snap = json.loads(next((run / "configs").glob("*-project.json")).read_text())
    assert snap["gradient_accumulation_steps"] == 2 and snap["max_epochs"] == 2
    assert snap["autoencoder_channels"] == [8, 8, 8] and not str(snap["device"]).startswith("%")
    record = json.loads((run / "configs" / "launch.json").read_text())
    assert record["overrides"]["gradient_accumulation_steps"] == 2 and record["limit_test_batches"] == 1
    assert [Path(f).name for f in record["files"]] == ["common.json", "train_autoencoder.json"]  # common put first
    assert "x gradient accumulation 2" in proc.stdout


def test_stage2_under_torchrun_then_generation_by_name(stage1_run):
    tmp, _ = stage1_run
    ae = only_run(tmp / "logs", "ae")
    proc = run_main([*STAGE2, "-t", "--no-test", "--name", "ldm", "max_epochs=2", "val_interval=1",
                     "base_learning_rate=1e-4", "accumulate_grad_batches=2", f"load_autoencoder_path={ae}",
                     "preview_num_samples=0", *tiny(tmp, stage2=True)], cwd=tmp, launcher=torchrun(2))
    run = only_run(tmp / "logs", "ldm")
    models = sorted(p.name for p in (run / "models").iterdir())
    assert models == ["checkpoint_diffusion.pt", "model.pt", "model_autoencoder.pt", "model_best.pt", "model_ema.pt",
                      "model_record.json"]
    assert len(list(run.glob("train_diffusion_*"))) == 1  # rank 1 wrote nothing
    state = torch.load(run / "models" / "checkpoint_diffusion.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-4 * 2 * 4 * 2)
    assert proc.stdout.count("stage 2 finished") == 1
    # no -t, same --name: the latest 'ldm' run generates limit_test_batches samples with its own weights
    run_main([*STAGE2, "--name", "ldm", "limit_test_batches=2", "test_only_params#num_inference_steps=3",
              "test_only_params.sampler=rflow"], cwd=tmp)
    generated = list(run.glob("generated_*"))
    assert len(generated) == 1
    assert sorted(p.name for p in generated[0].glob("*.nii.gz")) == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    manifest = json.loads((generated[0] / "manifest.json").read_text())
    assert manifest["num_inference_steps"] == 3


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    cmd = [sys.executable, MAIN, *STAGE1, "-t", "--no-test", "--name", "pre", "max_epochs=50", "val_interval=100",
           "save_interval=100", "train_batch_size=1", *tiny(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout:
        if "Epoch[1] Complete" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out
    run = only_run(tmp_path / "logs", "pre")
    saved = torch.load(run / "models" / "checkpoint_autoencoder.pt", weights_only=True)["engine"]
    # completed epochs: a signal that lands on the last iteration of an epoch saves it as completed
    assert saved["iteration"] > 6 and saved["epoch"] == saved["iteration"] // 6
    resumed = run_main(["--resume", str(run), "-t", "--no-test", f"max_epochs={saved['epoch'] + 1}"], cwd=tmp_path)
    assert f"resumed from {run / 'models' / 'checkpoint_autoencoder.pt'}: epoch {saved['epoch']}, " \
           f"iteration {saved['iteration']}" in resumed.stdout
    final = torch.load(run / "models" / "checkpoint_autoencoder.pt", weights_only=True)["engine"]
    assert final == {"epoch": saved["epoch"] + 1, "iteration": (saved["epoch"] + 1) * 6, "epoch_length": 6}


def test_overrides_and_aliases_are_parsed():
    files, overrides = launch.split_base(["configs/a.json", "max_epochs=3", "train.trainer.epoch_length=2",
                                          "accumulate_grad_batches=4", "lightning.trainer.limit_test_batches=5",
                                          "test_only_params#sampler=ddpm", 'test_only_params={"seed": 7}',
                                          "model.base_learning_rate=2e-6", "sampler=$'ddim'"])
    assert files == ["configs/a.json"]
    general, test_only, limit = launch.apply_aliases(overrides)
    assert general == {"max_epochs": 3, "train#trainer#epoch_length": 2, "gradient_accumulation_steps": 4,
                       "base_learning_rate": 2e-6, "sampler": "$'ddim'"}
    assert test_only == {"sampler": "ddpm", "seed": 7} and limit == 5


def test_test_workflow_of_each_training_config():
    def names(files):
        return [Path(f).name for f in launch.test_files([str(ROOT / f) for f in files])]

    assert names(["configs/common.json", "configs/train_autoencoder.json"]) == ["common.json",
                                                                                "inference_autoencoder.json"]
    assert names(["configs/train_autoencoder.json"]) == ["common.json", "inference_autoencoder.json"]
    assert names(["configs/common.json", "configs/train_autoencoder.json", "configs/train_diffusion.json",
                  "configs/brats.json"]) == ["common.json", "inference.json", "brats.json"]
    assert names(["configs/common.json", "configs/train_diffusion.json", "configs/vqvae.json"]) == [
        "common.json", "inference.json", "vqvae.json"]
    stage1 = [str(ROOT / "configs/common.json"), str(ROOT / "configs/train_autoencoder.json")]
    assert [Path(f).name for f in launch.train_files(stage1, 2)] == [
        "common.json", "train_autoencoder.json", "multi_gpu_train_autoencoder.json"]


def test_common_json_is_merged_first_when_base_lacks_it():
    """``--base configs/train_autoencoder.json`` (and run folders recorded before the configs were layered) run
    after configs/common.json; a list that names it stays as it is."""
    common, stage1 = str(ROOT / "configs/common.json"), str(ROOT / "configs/train_autoencoder.json")
    assert launch.with_common([stage1]) == [common, stage1]
    assert launch.with_common([common, stage1]) == [common, stage1]


def test_errors_name_the_fix(tmp_path):
    proc = run_main([*STAGE1, "-t", "--name", "typo", "max_epoch=2"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "unknown override key 'max_epoch'" in proc.stderr and "max_epochs" in proc.stderr
    proc = run_main([*STAGE2, "--name", "never_trained"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "no run named 'never_trained'" in proc.stderr and "-t --name" in proc.stderr
    proc = run_main(["--resume", str(tmp_path)], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "not a run folder of main.py" in proc.stderr
    proc = run_main(["--help"], cwd=tmp_path)
    assert "--base" in proc.stdout and "torchrun --nproc-per-node=2 main.py" in proc.stdout
