"""Bad input fails before training with one clear last line naming the file or key and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from scripts.demo_data import make_demo_dataset
from tests.helpers import COMMON, TINY, TWO_LEVEL_AUTOENCODER, config_network, overrides_for, run_bundle

TRAIN = [COMMON, "configs/train_autoencoder.json"]
INFER = [COMMON, "configs/inference_autoencoder.json"]


def _last_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errdata")
    make_demo_dataset(str(tmp), num_subjects=6, size=32, num_validation=1, num_test=1)
    return tmp


def _datalist_with(data, tmp_path, image: str) -> str:
    content = json.loads((data / "datalist.json").read_text())
    for item in content["training"] + content["validation"]:
        item["image"] = str(data / item["image"])
    content["training"][1]["image"] = image
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return str(path)


def _train(tmp_path, **extra):
    ov = overrides_for(tmp_path, max_epochs=1, **extra)
    return run_bundle(TRAIN, ov, check=False)


def test_missing_file_in_datalist(data, tmp_path):
    missing = str(tmp_path / "nowhere" / "ghost.nii.gz")
    proc = _train(tmp_path, datalist=_datalist_with(data, tmp_path, missing), dataset_dir=str(data))
    line = _last_line(proc)
    assert "names a missing file" in line and missing in line and "Fix the paths" in line
    assert not (tmp_path / "models").exists(), "nothing may be trained or written"


def test_unreadable_image(data, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    proc = _train(tmp_path, datalist=_datalist_with(data, tmp_path, str(bad)), dataset_dir=str(data))
    line = _last_line(proc)
    assert "cannot read image" in line and str(bad) in line


def test_missing_datalist(tmp_path):
    proc = _train(tmp_path, dataset_dir=str(tmp_path / "empty"))
    assert "no datalist found in dataset_dir" in _last_line(proc)


def test_patch_size_not_divisible(tmp_path):
    proc = _train(tmp_path, train_patch_size=[18, 18, 18])
    line = _last_line(proc)
    assert "train_patch_size=[18, 18, 18] is not divisible by the autoencoder's downsampling factor 4" in line
    assert "use e.g. train_patch_size=[16, 16, 16]" in line


def test_unknown_override_key(tmp_path):
    ov = overrides_for(tmp_path)
    ov["train#trainer#max_epoch"] = 2
    proc = run_bundle(TRAIN, ov, check=False)
    line = _last_line(proc)
    assert "unknown config key '--train#trainer#max_epoch'" in line and "train#trainer#max_epochs" in line
    assert not (tmp_path / "models").exists()


def test_missing_checkpoint_for_reconstruction(tmp_path):
    proc = run_bundle(INFER, overrides_for(tmp_path, infer=True), check=False)
    line = _last_line(proc)
    assert "autoencoder checkpoint not found" in line and "model_autoencoder.pt" in line


def test_mismatched_checkpoint_for_reconstruction(tmp_path):
    other = config_network("autoencoder_def", {**TINY, "autoencoder_channels": [8, 16, 16]})  # another size
    (tmp_path / "models").mkdir()
    torch.save(other.state_dict(), tmp_path / "models" / "model_autoencoder.pt")
    proc = run_bundle(INFER, overrides_for(tmp_path, infer=True), check=False)
    line = _last_line(proc)
    assert "does not match the network in the config" in line and "model_autoencoder.pt" in line


def test_non_finite_loss_stops_with_epoch_iteration_and_term(tmp_path):
    """A loss that turns infinite in epoch 2 stops the run; the epoch-1 checkpoint stays intact and loadable."""
    from ignite.engine import Events

    from scripts.engines import AutoencoderTrainer, NonFiniteLossError
    from scripts.handlers import TrainingCheckpoint
    from scripts.losses import AutoencoderLoss

    ae = config_network("autoencoder_def", TWO_LEVEL_AUTOENCODER, seed=0)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    loss = AutoencoderLoss(kl_weight=1e-6)
    data = [{"image": torch.rand(1, 1, 16, 16, 16)} for _ in range(3)]
    ckpt = TrainingCheckpoint(str(tmp_path), {"autoencoder": ae, "g_optimizer": opt}, filename="ckpt.pt")
    trainer = AutoencoderTrainer(device="cpu", max_epochs=3, train_data_loader=data, g_network=ae, g_optimizer=opt,
                                 loss_function=loss, train_handlers=[ckpt])

    @trainer.on(Events.EPOCH_COMPLETED(once=1))
    def _diverge(engine):
        loss.kl_weight = float("inf")

    with pytest.raises(NonFiniteLossError, match=r"loss term 'kl' became inf at epoch 2, iteration 4"):
        trainer.run()
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["engine"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["autoencoder"].values())
