"""MONAI bundle conventions: metadata schema, network in/out shapes, workflow properties, one definition per network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from tests.helpers import ROOT

SCHEMA = ROOT.parent / "shared" / "schema" / "meta_schema_20240725.json"
WORKFLOWS = ["configs/train_autoencoder.json", "configs/inference_autoencoder.json"]
MACRO_WORKFLOWS = [*WORKFLOWS, "configs/inference.json", "configs/evaluate.json"]
STAGE2 = ["configs/train_autoencoder.json", "configs/train_diffusion.json"]


@pytest.fixture(autouse=True)
def _bundle_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # macros in the configs are relative to the bundle root, as for `monai.bundle run`


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


@pytest.mark.skipif(not SCHEMA.is_file(), reason="offline schema copy lives in ../shared")
def test_metadata_verifies_against_schema():
    proc = _cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_verify_net_in_out_autoencoder():
    """The autoencoder is described by `autoencoder_data_format`, checked by pointing verify_net_in_out at it."""
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    proc = _cli("verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
                "--config_file", "configs/inference_autoencoder.json",
                "--_meta_#network_data_format", json.dumps(meta["autoencoder_data_format"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_verify_net_in_out_diffusion_unet():
    """`network_data_format` describes the diffusion UNet (latent in, latent out, through a fixed-timestep wrapper)."""
    proc = _cli("verify_net_in_out", "--net_id", "denoiser_def", "--meta_file", "configs/metadata.json",
                "--config_file", "configs/inference.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


@pytest.mark.parametrize("config_file,workflow_type", [(WORKFLOWS[0], "train"), (WORKFLOWS[1], "infer")],
                         ids=["stage1", "reconstruction"])
def test_workflow_properties(config_file, workflow_type, tmp_path):
    # bundle_root in tmp_path: resolving the trainer writes demo data and a run folder, never into the checkout
    wf = ConfigWorkflow(config_file=config_file, meta_file="configs/metadata.json", logging_file=False,
                        workflow_type=workflow_type, bundle_root=str(tmp_path), demo_size=32, demo_num_subjects=6)
    wf.parser.parse()  # properties are checked on the parsed config; the initialize expressions need weights
    wf._is_initialized = True
    assert wf.check_properties() in (None, [])


@pytest.mark.parametrize("config_file", MACRO_WORKFLOWS)
def test_every_workflow_takes_every_shared_definition_from_common(config_file):
    common = json.loads((ROOT / "configs" / "common.json").read_text())
    workflow = json.loads((ROOT / config_file).read_text())
    # stage-1 inference's network_def is the autoencoder (reconstruction wrapper), as MONAI's infer properties expect;
    # generation takes the noise schedule, spacing and orientation from the training record, and from common.json
    # (its `recipe`) only for weights without a record
    recipe = workflow.get("recipe", {}) if config_file == "configs/inference.json" else {}
    own = {"configs/inference_autoencoder.json": {"network_def"}}.get(config_file, set()) | set(recipe)
    for key in (k for k in common if not k.startswith("_") and k not in own):
        assert workflow.get(key) == f"%configs/common.json#{key}", f"{config_file}: '{key}' must be a macro"
    for key in recipe:
        assert recipe[key] == f"%configs/common.json#{key}", f"{config_file}: 'recipe#{key}' must be a macro"
        assert f"'{key}', @recipe#{key})" in workflow[key], f"{config_file}: '{key}' must fall back to the recipe"
    redefined = [k for k in ("autoencoder_def", "discriminator_def", "preprocessing_transforms")
                 if not str(workflow.get(k, "")).startswith("%")]
    assert not redefined


def test_train_and_inference_build_the_same_autoencoder():
    nets = []
    for config_file in WORKFLOWS:
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.parse()
        nets.append(parser.get_parsed_content("autoencoder_def"))
    a, b = (n.state_dict() for n in nets)
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_stage2_training_and_generation_build_the_same_unet():
    nets = []
    for config_file in (STAGE2, ["configs/common.json", "configs/train_diffusion.json"], "configs/inference.json"):
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.parse()
        nets.append(parser.get_parsed_content("network_def").state_dict())
    for other in nets[1:]:
        assert list(other) == list(nets[0]) and all(other[k].shape == nets[0][k].shape for k in other)
