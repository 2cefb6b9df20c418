"""The stage-2 training record: written with the weights, read by generation for its defaults, guarding overrides."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from scripts.handlers import TrainingCheckpoint
from scripts.records import check_against_record, check_weights_against_record, read_training_record, recorded
from scripts.storage import file_sha256
from tests.helpers import COMMON, ROOT, TINY, overrides_for, run_bundle

GENERATE = [COMMON, "configs/inference.json"]
RECORD = {"noise_scheduler_type": "ddpm", "num_train_timesteps": 1000, "beta_schedule": "linear_beta",
          "beta_start": 0.001, "beta_end": 0.02, "prediction_type": "v_prediction", "scale_factor": 0.42,
          "latent_shape": [4, 6, 8, 8], "volume_size": [24, 32, 32], "spacing": [1.5, 1.5, 2.0], "orientation": "LPS"}


def write_record(models, **changes):
    models.mkdir(parents=True, exist_ok=True)
    path = models / "model_record.json"
    path.write_text(json.dumps({**RECORD, **changes}))
    return path


def generation_config(tmp_path, monkeypatch, **overrides) -> ConfigParser:
    """inference.json as `monai.bundle run` resolves it (from the bundle root), tiny networks, models in tmp_path."""
    monkeypatch.chdir(ROOT)
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in GENERATE])
    parser.update({k: v for k, v in TINY.items() if k in parser.get()})
    parser.update({"model_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "outputs"), **overrides})
    return parser


def test_generation_takes_its_defaults_from_the_training_record(tmp_path, monkeypatch):
    record = write_record(tmp_path / "models")
    parser = generation_config(tmp_path, monkeypatch)
    scheduler = parser.get_parsed_content("sampler_scheduler")
    assert parser.get_parsed_content("sampler") == "ddim"
    assert scheduler.prediction_type == "v_prediction"  # a v-prediction model is sampled as one
    reference = torch.linspace(0.001, 0.02, 1000)  # linear_beta from the record, not the config's schedule
    torch.testing.assert_close(scheduler.betas, reference)
    assert parser.get_parsed_content("scale_factor") == 0.42
    assert parser.get_parsed_content("latent_shape") == [4, 6, 8, 8]
    assert parser.get_parsed_content("spacing") == [1.5, 1.5, 2.0]
    assert parser.get_parsed_content("orientation") == "LPS"
    assert parser.get_parsed_content("check_record") is True
    facts = parser.get_parsed_content("generate#record")
    assert facts["training_record_path"] == str(record)
    assert facts["scheduler"]["class"] == "scripts.schedulers.RespacedDDIMScheduler"
    assert facts["scheduler"]["settings"]["prediction_type"] == "v_prediction"
    assert facts["scheduler"]["settings"]["beta_start"] == 0.001


def test_image_size_override_sets_the_latent_shape_and_rflow_records_pick_rflow(tmp_path, monkeypatch):
    write_record(tmp_path / "models", noise_scheduler_type="rflow")
    parser = generation_config(tmp_path, monkeypatch, image_size=[32, 16, 32])
    assert parser.get_parsed_content("latent_shape") == [4, 8, 4, 8]
    assert parser.get_parsed_content("sampler") == "rflow"
    assert type(parser.get_parsed_content("sampler_scheduler")).__name__ == "ContinuousRFlowScheduler"


def test_weights_without_a_record_use_the_config_and_need_a_scale_factor(tmp_path, monkeypatch):
    parser = generation_config(tmp_path, monkeypatch, scale_factor=1.0)
    assert parser.get_parsed_content("training_record").path is None
    assert parser.get_parsed_content("prediction_type") == parser.get_parsed_content("recipe#prediction_type")
    assert parser.get_parsed_content("latent_shape") == [4, 8, 8, 8]  # volume_size 32^3, downsampled 4 times
    assert parser.get_parsed_content("check_record") is True
    with pytest.raises(KeyError, match="no training record was found .* pass --scale_factor explicitly"):
        recorded(read_training_record(str(tmp_path / "none.json")), "scale_factor")


def test_checkpoints_of_older_runs_give_their_record(tmp_path):
    path = tmp_path / "checkpoint_diffusion.pt"
    torch.save({"scale_factor": 0.42, "noise_scheduler_type": "ddpm", "prediction_type": "sample",
                "latent_shape": [4, 8, 8, 8], "diffusion": {}}, path)
    record = read_training_record(str(tmp_path / "model_record.json"), str(path))
    assert record.path == str(path) and recorded(record, "scale_factor") == pytest.approx(0.42)
    assert recorded(record, "prediction_type") == "sample" and recorded(record, "beta_start", 0.5) == 0.5


def test_an_override_that_contradicts_the_record_is_refused(tmp_path):
    record = write_record(tmp_path / "models")
    ov = overrides_for(tmp_path, generate=True, beta_start=0.0015)
    proc = run_bundle(GENERATE, ov, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ERROR: ValueError: beta_start=0.0015 contradicts the training record {record}, where beta_start=0.001; "
        "drop --beta_start (generation takes it from the record).")
    assert check_against_record(read_training_record(str(record)), {"spacing": [1.5, 1.5, 2], "beta_start": 0.001})


def test_weights_from_another_run_than_the_record_are_refused(tmp_path):
    """Generation refuses an autoencoder other than the one stage 2 was trained on, and diffusion weights other
    than those the record was written with (a retrained stage 1 beside an old stage 2, a copied record)."""
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"w": torch.zeros(2)}, models / "model_autoencoder.pt")
    torch.save({"w": torch.ones(2)}, models / "model_ema.pt")
    record = write_record(models, autoencoder_sha256=file_sha256(models / "model_autoencoder.pt"),
                          weights_sha256={"model_ema.pt": file_sha256(models / "model_ema.pt")})
    ae, ema = str(models / "model_autoencoder.pt"), str(models / "model_ema.pt")
    assert check_weights_against_record(read_training_record(str(record)), ae, ema)
    assert check_weights_against_record(read_training_record(None), ae, ema)  # no record: nothing to compare
    torch.save({"w": torch.full((2,), 3.0)}, models / "model_ema.pt")
    with pytest.raises(ValueError, match=r"model_ema.pt are not those the training record .* was written with"):
        check_weights_against_record(read_training_record(str(record)), ae, ema)
    torch.save({"w": torch.ones(2)}, models / "model_ema.pt")
    torch.save({"w": torch.ones(3)}, models / "model_autoencoder.pt")  # stage 1 retrained after stage 2
    proc = run_bundle(GENERATE, overrides_for(tmp_path, generate=True), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: ValueError: the autoencoder {ae} is not the one the diffusion model was trained on")
    assert last.endswith("pass --load_autoencoder_path of that run's autoencoder, or retrain stage 2 on this one.")


def test_training_checkpoint_writes_the_record_beside_the_weights(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    TrainingCheckpoint(str(tmp_path), {"diffusion": net}, filename="checkpoint_diffusion.pt",
                       weights={"diffusion": "model.pt"}, record={"scale_factor": 0.5},
                       save_on_signals=()).attach(engine)
    engine.run([0, 1], max_epochs=2)
    record = json.loads((tmp_path / "model_record.json").read_text())
    assert record["scale_factor"] == 0.5 and record["epoch"] == 2 and record["iteration"] == 4
    assert record["weights_sha256"] == {"model.pt": file_sha256(tmp_path / "model.pt")}
    state = torch.load(tmp_path / "checkpoint_diffusion.pt", weights_only=True)
    assert state["record"] == {"scale_factor": 0.5}
