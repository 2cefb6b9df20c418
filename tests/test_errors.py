"""Bad input fails before training with one clear last line naming the file or key and the fix."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
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


def _bad_image(data, tmp_path, kind: str) -> str:
    """A file (or folder) of the kind named, made from a good demo volume."""
    good = data / json.loads((data / "datalist.json").read_text())["training"][0]["image"]
    if kind == "truncated":  # header fine, data cut to a third: stage 1 died with SIGABRT on it
        path = tmp_path / "truncated.nii.gz"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    elif kind == "directory":
        path = tmp_path / "a_folder"
        path.mkdir()
        (path / "notes.txt").write_text("no image here")
    else:
        img = nib.load(good)
        volume = np.asarray(img.dataobj, dtype=np.float32)
        volume = {"2D": volume[:, :, 0], "5D": volume[:8, :8, :8, None, None].repeat(2, 3).repeat(2, 4),
                  "NaN": np.where(np.arange(volume.size).reshape(volume.shape) == 7, np.nan, volume)}[kind]
        path = tmp_path / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(volume, img.affine), path)
    return str(path)


@pytest.mark.parametrize("kind, words", [
    ("truncated", "is truncated: its header implies"),
    ("directory", "is a directory, not an image file"),
    ("2D", "is 2D (shape (32, 32))"),
    ("5D", "is 5D (shape (8, 8, 8, 2, 2))"),
    ("NaN", "holds 1 NaN or infinite voxels"),
])
def test_bad_image_is_named_before_training(data, tmp_path, kind, words):
    bad = _bad_image(data, tmp_path, kind)
    proc = _train(tmp_path, datalist=_datalist_with(data, tmp_path, bad), dataset_dir=str(data), num_workers=2)
    line = _last_line(proc)
    assert words in line and f"'{bad}'" in line and "remove it from the datalist" in line, line
    assert proc.returncode == 1 and "Epoch[1]" not in proc.stdout + proc.stderr
    assert not (tmp_path / "models").exists(), "nothing may be trained or written"


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


@pytest.mark.parametrize("kind", ["truncated", "foreign", "not_a_checkpoint"])
def test_bad_resume_checkpoint_is_named_and_left_intact(tmp_path, kind):
    """A resume checkpoint cut short, written by another workflow, or not a checkpoint at all: one line naming it,
    before any iteration, and the file is left as it was."""
    from scripts.engines import AutoencoderTrainer
    from scripts.handlers import TrainingCheckpoint
    from scripts.losses import AutoencoderLoss

    ae = config_network("autoencoder_def", TWO_LEVEL_AUTOENCODER, seed=0)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    path = tmp_path / "checkpoint_autoencoder.pt"
    if kind == "truncated":
        torch.save({"autoencoder": ae.state_dict(), "g_optimizer": opt.state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "foreign":  # a stage-2 checkpoint
        torch.save({"diffusion": {}, "ema": {}, "optimizer": {}, "engine": {"epoch": 1, "iteration": 3}}, path)
    else:
        path.write_text("not a checkpoint")
    before = path.read_bytes()
    ckpt = TrainingCheckpoint(str(tmp_path), {"autoencoder": ae, "g_optimizer": opt},
                              filename="checkpoint_autoencoder.pt", resume=True)
    trainer = AutoencoderTrainer(device="cpu", max_epochs=2, g_network=ae, g_optimizer=opt,
                                 train_data_loader=[{"image": torch.rand(1, 1, 16, 16, 16)}],
                                 loss_function=AutoencoderLoss(), train_handlers=[ckpt])
    words = "lacks ['autoencoder', 'g_optimizer', 'g_step']: it was written by another workflow" \
        if kind == "foreign" else "with weights_only=True"
    with pytest.raises(ValueError, match=rf"{path}.*{words}|{words}.*{path}".replace("[", r"\[").replace("]", r"\]")):
        trainer.run()
    assert trainer.state.iteration == 0 and path.read_bytes() == before


def test_corrupt_latent_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    """A latent cache cut short, with NaNs, or listing other files is re-encoded (with a warning), never used."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from scripts.latents import cached_latents

    ae = config_network("autoencoder_def", TWO_LEVEL_AUTOENCODER, seed=0)
    items = []
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), tmp_path / f"{i}.nii")
        items.append({"image": str(tmp_path / f"{i}.nii")})
    transform = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
    (ae_path := tmp_path / "model_autoencoder.pt").write_bytes(b"weights")  # the cache key hashes this file

    def latents():
        return cached_latents(ae, str(ae_path), items, transform, str(tmp_path / "cache"), "training", "cpu")

    good = latents()
    cache = next((tmp_path / "cache").glob("latents_training_*.pt"))
    assert "encoded 2 training" in capsys.readouterr().out
    nan = [{**good[0], "z_mu": good[0]["z_mu"] * float("nan")}, good[1]]
    for damage, words in [(lambda: cache.write_bytes(cache.read_bytes()[:100]), "cannot be read"),
                          (lambda: torch.save(nan, cache), "holds no finite z_mu/z_sigma pair"),
                          (lambda: torch.save(good[::-1], cache), "does not list"),
                          (lambda: torch.save(good[:1], cache), "holds 1 items, expected 2")]:
        damage()
        rebuilt = latents()
        out = capsys.readouterr().out
        assert f"WARNING: cache '{cache}' {words}" in out and "rebuilding it" in out and "encoded 2" in out, out
        assert all(torch.equal(a["z_mu"], b["z_mu"]) for a, b in zip(rebuilt, good, strict=True))
    latents()
    assert "encoded" not in capsys.readouterr().out  # a sound cache is used as it is


def test_image_check_reads_only_the_header_and_gzip_trailer_of_a_sound_file(data, tmp_path, monkeypatch):
    """A sound .nii.gz is accepted from its header and gzip trailer (start-up stays fast for thousands of files);
    a file in several gzip members is decompressed to be sure, and one 10 bytes short is refused."""
    import gzip
    import zlib

    from scripts.data import check_readable

    good = data / json.loads((data / "datalist.json").read_text())["training"][0]["image"]
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:-10]))
    check_readable(tmp_path / "members.nii.gz")
    with pytest.raises(ValueError, match=rf"short.nii.gz' is truncated: its header implies {len(raw)} bytes, the "
                                         rf"file holds {len(raw) - 10}"):
        check_readable(tmp_path / "short.nii.gz")
    decompressobj = zlib.decompressobj

    def header_only(*args, **kwargs):  # gzip reads the header with raw deflate; the full check asks for gzip format
        assert args[:1] != (16 + zlib.MAX_WBITS,), "a sound file was decompressed in full"
        return decompressobj(*args, **kwargs)

    monkeypatch.setattr(zlib, "decompressobj", header_only)
    check_readable(good)
