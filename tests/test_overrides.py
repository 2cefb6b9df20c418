"""Command-line overrides: booleans typed once at the boundary (``--amp false`` is false), the Model Zoo BraTS
bundle's overrides accepted where they mean something here and refused with one line otherwise."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.checks import as_bool, check_overrides, typed_overrides
from tests.helpers import COMMON, ROOT, overrides_for, run_bundle

STAGE1 = [COMMON, "configs/train_autoencoder.json"]
STAGE2 = [COMMON, "configs/train_diffusion.json"]
GENERATE = [COMMON, "configs/inference.json"]
RECONSTRUCT = [COMMON, "configs/inference_autoencoder.json"]
EVALUATE = [COMMON, "configs/evaluate.json"]
VQVAE_STAGE1 = [*STAGE1, "configs/vqvae.json"]
MULTI_GPU_STAGE1 = [*STAGE1, "configs/multi_gpu_train_autoencoder.json"]
MULTI_GPU_STAGE2 = [*STAGE2, "configs/multi_gpu_train_diffusion.json"]

#: every boolean the README, docs/README.md and the configs document, in each workflow that reads it
BOOLEANS = {
    "amp-stage1": ("amp", STAGE1), "amp-stage2": ("amp", STAGE2), "amp-generation": ("amp", GENERATE),
    "amp-reconstruction": ("amp", RECONSTRUCT), "amp-evaluation": ("amp", EVALUATE),
    "scale_lr-stage1": ("scale_lr", STAGE1), "scale_lr-stage2": ("scale_lr", STAGE2),
    "resume-stage1": ("resume", STAGE1), "resume-stage2": ("resume", STAGE2),
    "perceptual_fake_3d-stage1": ("perceptual_fake_3d", STAGE1),
    "vq_reinit_dead_codes-stage1": ("vq_reinit_dead_codes", STAGE1),
    "vq_reinit_dead_codes-vqvae": ("vq_reinit_dead_codes", VQVAE_STAGE1),
    "latent_cache-stage2": ("latent_cache", STAGE2),
    "use_ema-generation": ("use_ema", GENERATE),
    "write_eval_metrics-evaluation": ("write_eval_metrics", EVALUATE),
    "find_unused_parameters-multi_gpu_stage1": ("find_unused_parameters", MULTI_GPU_STAGE1),
    "find_unused_parameters-multi_gpu_stage2": ("find_unused_parameters", MULTI_GPU_STAGE2),
    "shuffle-multi_gpu_stage1": ("train#dataloader#shuffle", MULTI_GPU_STAGE1),  # a nested key of an overlay
}


@pytest.fixture(autouse=True)
def _bundle_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # macros in the configs are relative to the bundle root, as for `monai.bundle run`


def _resolved(files, key, text, tmp_path, monkeypatch, probe=None):
    """``key`` (and ``probe``) as the workflow sees them after ``monai.bundle run ... --<key> <text>``: the
    command line as python-fire passes it, the workflow's first initialize step (check_overrides), then lookup."""
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file", json.dumps(files), f"--{key}", text])
    wf = ConfigWorkflow(config_file=files, logging_file=False, workflow_type=None, bundle_root=str(tmp_path),
                        **{key: text})
    wf.parser.parse()
    wf.parser.get_parsed_content("initialize#0")
    value = wf.parser.get_parsed_content(key)
    return value, (wf.parser.get_parsed_content(probe) if probe else None)


@pytest.mark.parametrize("text,expected", [("false", False), ("true", True)])
@pytest.mark.parametrize("case", list(BOOLEANS))
def test_documented_booleans_arrive_typed_both_ways(case, text, expected, tmp_path, monkeypatch):
    key, files = BOOLEANS[case]
    value, _ = _resolved(files, key, text, tmp_path, monkeypatch)
    assert value is expected


@pytest.mark.parametrize("text,weights", [("false", "/model.pt"), ("true", "/model_ema.pt")])
def test_use_ema_reaches_the_weights_path(text, weights, tmp_path, monkeypatch):
    _, path = _resolved(GENERATE, "use_ema", text, tmp_path, monkeypatch, probe="load_diffusion_path")
    assert path.endswith(weights)


def test_scale_lr_false_reaches_the_learning_rate(tmp_path, monkeypatch):
    _, lr = _resolved(STAGE1, "scale_lr", "false", tmp_path, monkeypatch, probe="lr")
    assert lr == pytest.approx(2.5e-4)  # base_learning_rate unscaled; scaled it is x batch size 2


@pytest.mark.parametrize("word,expected", [("False", False), ("0", False), ("no", False), (0, False),
                                           ("TRUE", True), ("1", True), ("yes", True), (1, True)])
def test_boolean_spellings(word, expected):
    assert as_bool(word) is expected


def test_a_boolean_given_another_word_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"--amp: expected true or false, got 'flase'"):
        typed_overrides(STAGE1, {"amp": "flase"})
    # resume also takes a checkpoint path; expressions stay expressions
    assert typed_overrides(STAGE1, {"resume": "models/checkpoint_autoencoder.pt"})["resume"].endswith(".pt")
    assert typed_overrides(STAGE1, {"amp": "$torch.cuda.is_available()"})["amp"] == "$torch.cuda.is_available()"


def test_main_py_overrides_are_typed_by_the_same_converter():
    from scripts import launch

    _, overrides = launch.split_base(["configs/train_autoencoder.json", "amp=no", "scale_lr=false", "max_epochs=3"])
    assert typed_overrides(STAGE1, overrides) == {"amp": False, "scale_lr": False, "max_epochs": 3}


def test_check_overrides_outside_monai_bundle_run_changes_nothing():
    assert check_overrides(["--amp", "false"]) is True  # no --config_file: not a `monai.bundle run` command line


# ---- end to end through `python -m monai.bundle run` ---------------------------------------------------------


def _untrained_weights(files, models, **overrides) -> ConfigParser:
    """Save the untrained autoencoder of ``files`` with ``overrides`` as ``models/model_autoencoder.pt``; returns
    the parsed config (for more networks)."""
    parser = ConfigParser(ConfigParser.load_config_files(files))
    for k, v in overrides.items():
        parser[k] = v
    parser.parse()
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), models / "model_autoencoder.pt")
    return parser


def test_amp_false_and_true_end_to_end(tmp_path):
    """Reconstruction with untrained weights: `--amp false` reconstructs in float32 (as the network does
    in-process), `--amp true` autocasts the autoencoder (bfloat16 on CPU)."""
    import nibabel as nib

    ov = overrides_for(tmp_path, infer=True, max_cases=1)
    parser = _untrained_weights(RECONSTRUCT, tmp_path / "models", **ov, amp=False)  # the float32 reference
    recon = {}
    for amp in ("false", "true"):
        before = set((tmp_path / "outputs").glob("reconstruction_*"))
        run_bundle(RECONSTRUCT, {**ov, "amp": amp})
        (folder,) = set((tmp_path / "outputs").glob("reconstruction_*")) - before
        recon[amp] = torch.as_tensor(nib.load(next(folder.glob("*_reconstruction.nii.gz"))).get_fdata())
        image = torch.as_tensor(nib.load(next(folder.glob("*_input.nii.gz"))).get_fdata(), dtype=torch.float32)
    network = parser.get_parsed_content("reconstruction_def").eval()
    network.load_state_dict(torch.load(tmp_path / "models" / "model_autoencoder.pt"))  # strictly: no key prefix
    with torch.no_grad():
        reference = parser.get_parsed_content("reconstruction_inferer")(image[None, None], network)[0, 0].double()
    torch.testing.assert_close(recon["false"], reference, atol=1e-4, rtol=0)
    assert (recon["true"] - reference).abs().max() > 1e-3


def test_latent_cache_false_and_brats_cache_rate_end_to_end(tmp_path):
    """Stage 2 with `--latent_cache false` encodes the images on the fly; the BraTS bundle's
    `--train#dataset#cache_rate 0.5` sets how many of them its CacheDataset holds."""
    ov = overrides_for(tmp_path, stage2=True, max_epochs=1, val_interval=5, train_batch_size=2, demo_num_subjects=6)
    _untrained_weights(STAGE2, tmp_path / "models", **ov)
    proc = run_bundle(STAGE2, {**ov, "latent_cache": "false", "train#dataset#cache_rate": 0.5})
    assert "[latents] stage-2 training data: 2 images encoded on the fly (latent_cache false, cache_rate 0.5)" \
        in proc.stdout


def test_use_ema_false_end_to_end(tmp_path):
    """Generation with `--use_ema false` samples with model.pt, not model_ema.pt (the manifest says which)."""
    ov = overrides_for(tmp_path, generate=True, num_samples=1, num_inference_steps=2, scale_factor=1.0)
    parser = _untrained_weights(GENERATE, tmp_path / "models", **ov)
    for name in ("model.pt", "model_ema.pt"):
        torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / name)
    run_bundle(GENERATE, {**ov, "use_ema": "false"})
    manifest = json.loads(next((tmp_path / "outputs").glob("generated_*/manifest.json")).read_text())
    assert manifest["use_ema"] is False and manifest["diffusion_path"].endswith("/model.pt")


# ---- the Model Zoo BraTS bundle's stage-2 overrides -------------------------------------------------------------


def test_brats_cache_rate_override_sets_the_stage2_cache(tmp_path):
    ov = overrides_for(tmp_path, stage2=True, demo_num_subjects=6, latent_cache=False)
    _untrained_weights(STAGE2, tmp_path / "models", **ov)
    wf = ConfigWorkflow(config_file=STAGE2, logging_file=False, workflow_type=None, **ov,
                        **{"train#dataset#cache_rate": 0.5})
    wf.parser.parse()
    dataset = wf.parser.get_parsed_content("train#dataset")
    assert len(dataset) == 2 and dataset.cache_num == 1
    # the same knob for both stages: a top-level id
    assert wf.parser["train#dataset#cache_rate"] == 0.5 and ConfigParser.load_config_files(STAGE1)["cache_rate"] == 1


def test_brats_latent_shape_override_is_refused_with_one_line(tmp_path):
    argv = ["--config_file", json.dumps(STAGE2), "--latent_shape", "[8,36,44,28]"]
    with pytest.raises(ValueError) as err:
        check_overrides(argv)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "--latent_shape cannot be overridden: latent_shape is derived from volume_size")
    assert "set --volume_size (or --image_size) and --latent_channels instead" in message
    with pytest.raises(ValueError, match="--latent_shape cannot be overridden"):
        check_overrides(["--config_file", json.dumps(GENERATE), "--latent_shape", "[4,8,8,8]"])


def test_nested_and_referenced_booleans_reach_their_consumer(tmp_path, monkeypatch):
    """A nested key and an id read through ``@`` both reach the component that consumes them typed."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "imports": ["$import scripts"], "flag": True,
        "node": {"_target_": "builtins.dict", "shuffle": True, "flag": "@flag"},
        "initialize": ["$scripts.checks.check_overrides()"],
    }))
    overrides = {"node#shuffle": "false", "flag": "false"}
    argv = ["run", "--config_file", str(config), *[t for k, v in overrides.items() for t in (f"--{k}", v)]]
    monkeypatch.setattr(sys, "argv", ["monai.bundle", *argv])
    wf = ConfigWorkflow(config_file=str(config), logging_file=False, workflow_type=None, **overrides)
    wf.initialize()
    assert wf.parser.get_parsed_content("node") == {"shuffle": False, "flag": False}
