"""Stage 1 through `python -m monai.bundle run`: training, resume, reconstruction to NIfTI."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import COMMON, copied, overrides_for, run_bundle

TRAIN = [COMMON, "configs/train_autoencoder.json"]
INFER = [COMMON, "configs/inference_autoencoder.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch stage-1 run (adversarial loss from epoch 2), shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("stage1")
    ov = overrides_for(tmp, max_epochs=2, val_interval=1, save_interval=1, train_batch_size=1, lr=1e-3,
                       adversarial_weight=0.01, adversarial_warmup_epochs=1)
    proc = run_bundle(TRAIN, ov)
    return tmp, ov, proc


def _run_dir(tmp, prefix):
    dirs = sorted((tmp / "outputs").glob(f"{prefix}_*"))
    assert dirs, f"no {prefix} run folder"
    return dirs


def test_training_writes_checkpoints_previews_and_loss_goes_down(trained):
    tmp, _, proc = trained
    models = tmp / "models"
    for name in ("model_autoencoder.pt", "checkpoint_autoencoder.pt", "model_autoencoder_best.pt"):
        assert (models / name).is_file(), name
    state = torch.load(models / "checkpoint_autoencoder.pt", weights_only=True)
    assert {"autoencoder", "discriminator", "g_optimizer", "d_optimizer", "g_step", "d_step", "engine"} <= set(state)
    assert state["engine"]["epoch"] == 2
    weights = torch.load(models / "model_autoencoder.pt", weights_only=True)
    assert all(torch.equal(weights[k], state["autoencoder"][k]) for k in weights)

    run_dir = _run_dir(tmp, "train_autoencoder")[-1]
    previews = sorted(p.name for p in (run_dir / "previews").glob("*.png"))
    assert previews == ["stage1_epoch0001.png", "stage1_epoch0002.png"]
    assert (run_dir / "loss_curves.png").stat().st_size > 1000
    assert list(run_dir.glob("events.out.tfevents.*"))
    curves = json.loads((run_dir / "loss_curves.json").read_text())
    recon = [v for _, v in curves["recon"]]
    assert len(recon) == 2 and recon[1] < recon[0], recon
    assert "d_loss" in curves and len(curves["d_loss"]) == 1  # adversarial from epoch 2 only
    assert "Metrics -- val_ms_ssim" in proc.stdout + proc.stderr


def test_resume_continues_epoch_count(trained, tmp_path):
    tmp, ov, _ = trained
    ov = copied(ov, tmp_path)  # the other tests read the 2-epoch run
    proc = run_bundle(TRAIN, {**ov, "max_epochs": 3, "resume": True, "val_interval": 5})
    assert "resumed from" in proc.stdout and "epoch 2" in proc.stdout
    state = torch.load(tmp_path / "models" / "checkpoint_autoencoder.pt", weights_only=True)
    assert state["engine"]["epoch"] == 3
    assert state["engine"]["iteration"] == 3 * state["engine"]["epoch_length"]


def test_reconstruction_writes_nifti_with_source_affine_and_never_overwrites(trained):
    tmp, _ov, _ = trained
    infer_ov = overrides_for(tmp, infer=True)
    run_bundle(INFER, infer_ov)
    run_bundle(INFER, infer_ov)
    runs = _run_dir(tmp, "reconstruction")
    assert len(runs) == 2, "a second inference run must write a new folder"
    out = runs[0]
    datalist = json.loads((tmp / "data" / "datalist.json").read_text())
    test_subjects = [item["subject"] for item in datalist["test"]]
    for subject, item in zip(test_subjects, datalist["test"], strict=True):
        source = nib.load(tmp / "data" / item["image"])
        for kind in ("input", "reconstruction"):
            img = nib.load(out / f"{subject}_{kind}.nii.gz")
            assert img.shape == (32, 32, 32)
            np.testing.assert_allclose(img.affine, source.affine, atol=1e-4)
            np.testing.assert_allclose(img.header.get_zooms(), source.header.get_zooms(), atol=1e-5)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["subject"] for r in rows] == test_subjects
    assert all(float(r["psnr"]) > 0 and -1 <= float(r["ssim"]) <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_volumes"] == 2 and summary["psnr"]["mean"] > 0
