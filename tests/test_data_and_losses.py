"""Real-data entry points and optional loss terms: the Decathlon layout, datalist checks, the local perceptual loss."""

from __future__ import annotations

import json

import pytest
import torch

from scripts.data import SelectChanneld, decathlon_items, load_datalist
from scripts.losses import AutoencoderLoss, LocalPerceptualLoss, kl_divergence
from tests.helpers import fake_brats


def test_decathlon_sections_split_like_monai(tmp_path):
    fake_brats(tmp_path)
    train = decathlon_items(str(tmp_path), "Task01_BrainTumour", "training", val_frac=0.2)
    val = decathlon_items(str(tmp_path), "Task01_BrainTumour", "validation", val_frac=0.2)
    assert len(train) == 4 and len(val) == 1
    assert not {i["image"] for i in train} & {i["image"] for i in val}


def test_decathlon_missing_task_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="Set --dataset_dir to the folder that contains 'Task01_BrainTumour/'"):
        decathlon_items(str(tmp_path), "Task01_BrainTumour", "training")


def test_flair_channel_selection():
    out = SelectChanneld("image", channel=0)({"image": torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 2, 2)})
    assert out["image"].shape == (1, 2, 2, 2) and float(out["image"].max()) == 0.0
    with pytest.raises(ValueError, match="cannot select channel 5"):
        SelectChanneld("image", channel=5)({"image": torch.zeros(4, 2, 2, 2)})


def test_datalist_split_missing_names_the_split(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(KeyError, match="has no 'validation' entries"):
        load_datalist(str(path), "validation")


class _Features(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.conv(x)
        return [f, torch.relu(f)]


def test_local_perceptual_loss_from_torchscript_file(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(_Features()), str(path))
    loss = LocalPerceptualLoss(str(path), spatial_dims=3)
    x = torch.rand(2, 1, 8, 8, 8)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, torch.rand_like(x))) > 0
    terms = AutoencoderLoss(perceptual_weight=0.5, perceptual_network=loss).generator_terms(
        x, torch.rand_like(x), {"kl": kl_divergence(torch.zeros(2, 2, 2, 2, 2), torch.ones(2, 2, 2, 2, 2))})
    assert set(terms) == {"recon", "kl", "perceptual"} and float(terms["kl"]) == pytest.approx(0.0, abs=1e-9)


def test_perceptual_weight_without_network_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set perceptual_network_path"):
        AutoencoderLoss(perceptual_weight=0.1)
    with pytest.raises(FileNotFoundError, match="perceptual network .* not found"):
        LocalPerceptualLoss(str(tmp_path / "none.pt"))


def test_ssim_term_penalises_lost_structure_more_than_l1_does():
    """The structural term is 0 on a perfect reconstruction, and weighs a blur (lost edges) far more, relative to a
    uniform intensity shift of the same L1 error, than L1 does."""
    from monai.transforms import GaussianSmooth

    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8, 8).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    blurred = GaussianSmooth(1.0)(x[0])[None]
    shifted = x + (blurred - x).abs().mean()
    loss = AutoencoderLoss(ssim_weight=1.0)
    same = loss.generator_terms(x, x, {"kl": torch.zeros(())})
    assert float(same["ssim"]) == pytest.approx(0.0, abs=1e-5)
    blur, shift = (loss.generator_terms(r, x, {"kl": torch.zeros(())}) for r in (blurred, shifted))
    assert float(blur["recon"]) == pytest.approx(float(shift["recon"]), rel=0.1)
    assert float(blur["ssim"]) > 5 * float(shift["ssim"])
    assert "ssim" not in AutoencoderLoss().generator_terms(x, x, {"kl": torch.zeros(())})


def test_l2_term_is_the_weighted_mean_squared_error_and_absent_by_default():
    torch.manual_seed(0)
    x, recon = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    terms = AutoencoderLoss(l2_weight=10.0).generator_terms(recon, x, {"kl": torch.zeros(())})
    assert float(terms["l2"]) == pytest.approx(10.0 * float(((recon - x) ** 2).mean()), rel=1e-5)
    assert float(terms["recon"]) == pytest.approx(float((recon - x).abs().mean()), rel=1e-5)  # L1 unchanged
    assert "l2" not in AutoencoderLoss().generator_terms(recon, x, {"kl": torch.zeros(())})


def test_spectral_term_is_added_when_weighted():
    x = torch.rand(1, 1, 8, 8, 8)
    terms = AutoencoderLoss(spectral_weight=1.0).generator_terms(x, x, {"kl": torch.zeros(())})
    assert "spectral" in terms and float(terms["spectral"]) == pytest.approx(0.0, abs=1e-6)
