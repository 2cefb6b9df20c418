"""Config layering: configs/common.json is merged first and each workflow config holds only its own keys, so a nested
key of a shared definition can be overridden on the command line in every workflow, and a workflow started without
common.json stops at its first initialize step with one line naming the fix."""

from __future__ import annotations

import json
import re

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.checks import check_layering
from tests.helpers import COMMON, ROOT, TINY, TINY_DIFFUSION, config_network, overrides_for, run_bundle

TRAIN_AE, TRAIN_DIFF = "configs/train_autoencoder.json", "configs/train_diffusion.json"
INFER_AE, GENERATE, EVALUATE = "configs/inference_autoencoder.json", "configs/inference.json", "configs/evaluate.json"
WORKFLOW_CONFIGS = [TRAIN_AE, TRAIN_DIFF, INFER_AE, GENERATE, EVALUATE]

#: nested overrides of the two shared network definitions (different from the TINY sizes, valid with them)
AUTOENCODER_CHANNELS = {"autoencoder_def#channels": [8, 16, 16]}
UNET_RES_BLOCKS = {"network_def#num_res_blocks": 2}


@pytest.fixture(autouse=True)
def _bundle_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the bundle root, as for `monai.bundle run`


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_nested_override_of_a_shared_definition_reaches_the_stage1_network(tmp_path):
    """`--autoencoder_def#channels "[8,16,16]"` (MONAI applies overrides before it resolves macros, so this failed
    while the workflow configs took autoencoder_def through a '%configs/common.json#' macro)."""
    ov = overrides_for(tmp_path, max_epochs=1, val_interval=5, **AUTOENCODER_CHANNELS)
    run_bundle([COMMON, TRAIN_AE], ov)
    trained = torch.load(tmp_path / "models" / "model_autoencoder.pt", weights_only=True)
    expected = config_network("autoencoder_def", {**TINY, **AUTOENCODER_CHANNELS}).state_dict()
    assert _shapes(trained) == _shapes(expected)
    assert _shapes(trained) != _shapes(config_network("autoencoder_def", TINY).state_dict())  # [8, 8, 8] otherwise
    (run,) = (tmp_path / "outputs").glob("train_autoencoder_*")
    assert json.loads((run / "config.json").read_text())["autoencoder_def"]["channels"] == [8, 16, 16]


def test_nested_overrides_of_shared_definitions_reach_generation(tmp_path):
    """`--network_def#num_res_blocks 2 --autoencoder_def#channels "[8,16,16]"`: generation builds both networks with
    them (weights of those sizes load; without the overrides they do not)."""
    nested = {**AUTOENCODER_CHANNELS, **UNET_RES_BLOCKS}
    ov = overrides_for(tmp_path, generate=True, num_samples=1, num_inference_steps=2, scale_factor=1.0)
    models = tmp_path / "models"
    models.mkdir()
    torch.save(config_network("autoencoder_def", {**TINY, **nested}).state_dict(), models / "model_autoencoder.pt")
    torch.save(config_network("network_def", {**TINY_DIFFUSION, **nested}).state_dict(), models / "model_ema.pt")
    run_bundle([COMMON, GENERATE], {**ov, **nested})
    (folder,) = (tmp_path / "outputs").glob("generated_*")
    assert (folder / "sample_0000.nii.gz").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["network_def"]["num_res_blocks"] == 2 and config["autoencoder_def"]["channels"] == [8, 16, 16]
    without = run_bundle([COMMON, GENERATE], ov, check=False)
    assert without.returncode != 0 and "does not match" in without.stderr.strip().splitlines()[-1]


#: each workflow (and the VQ-VAE overlay, whose network has its own keys) with nested overrides of shared definitions
NESTED = {
    "stage1": ([COMMON, TRAIN_AE], {"autoencoder_def#num_res_blocks": 2}),
    "stage2": ([COMMON, TRAIN_DIFF], {"autoencoder_def#num_res_blocks": 2, **UNET_RES_BLOCKS}),
    "stage2_after_stage1": ([COMMON, TRAIN_AE, TRAIN_DIFF], {"autoencoder_def#num_res_blocks": 2, **UNET_RES_BLOCKS}),
    "reconstruction": ([COMMON, INFER_AE], {"autoencoder_def#num_res_blocks": 2}),
    "generation": ([COMMON, GENERATE], {"autoencoder_def#num_res_blocks": 2, **UNET_RES_BLOCKS}),
    "evaluation": ([COMMON, EVALUATE], {"autoencoder_def#num_res_blocks": 2}),
    "vqvae_stage1": ([COMMON, TRAIN_AE, "configs/vqvae.json"], {"autoencoder_def#num_res_layers": 2}),
}


@pytest.mark.parametrize("name", list(NESTED))
def test_every_workflow_takes_nested_overrides_of_the_shared_definitions(name):
    """The overrides, applied as `monai.bundle run` applies its command line, reach the networks of every workflow."""
    files, nested = NESTED[name]
    wf = ConfigWorkflow(config_file=files, meta_file="configs/metadata.json", logging_file=False, workflow_type=None,
                        **nested)
    base = [f for f in files if f in (COMMON, "configs/vqvae.json")]
    expected = config_network("autoencoder_def", nested, configs=base).state_dict()
    assert _shapes(wf.parser.get_parsed_content("autoencoder_def").state_dict()) == _shapes(expected)
    assert _shapes(expected) != _shapes(config_network("autoencoder_def", configs=base).state_dict())
    if "network_def#num_res_blocks" in nested:
        expected = config_network("network_def", nested).state_dict()
        assert _shapes(wf.parser.get_parsed_content("network_def").state_dict()) == _shapes(expected)
        assert _shapes(expected) != _shapes(config_network("network_def").state_dict())


@pytest.mark.parametrize("workflow", WORKFLOW_CONFIGS)
def test_workflow_without_common_json_stops_with_one_line_naming_the_fix(workflow, tmp_path):
    proc = run_bundle(workflow, overrides_for(tmp_path), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    fix = f"--config_file \"['{COMMON}','{workflow}']\""
    assert last.startswith(f"ERROR: ValueError: {workflow} is merged after {COMMON}: {fix} ({COMMON} defines '"), last
    assert not (tmp_path / "models").exists() and not (tmp_path / "outputs").exists()


def test_workflows_without_common_json_name_every_file_in_the_fix(tmp_path):
    proc = run_bundle([TRAIN_AE, TRAIN_DIFF], overrides_for(tmp_path), check=False)
    fix = f"--config_file \"['{COMMON}','{TRAIN_AE}','{TRAIN_DIFF}']\""
    assert f"ERROR: ValueError: {TRAIN_AE} and {TRAIN_DIFF} are merged after {COMMON}: {fix}" in \
        proc.stderr.strip().splitlines()[-1]


def test_common_json_merged_after_the_workflow_config_is_refused():
    with pytest.raises(ValueError) as err:
        check_layering({}, [TRAIN_AE, COMMON])
    assert str(err.value).startswith(f"{COMMON} is merged first, before the workflow config and overlays: "
                                     f"--config_file \"['{COMMON}','{TRAIN_AE}']\"")
    check_layering({"device": "cpu", "x": "@device"}, [COMMON, TRAIN_AE])  # in order: nothing to say


def test_python_api_without_common_json_names_the_fix():
    """ConfigWorkflow (no command line to quote) names the list to pass; a config that reads no shared id (not a
    workflow of this bundle) is left alone."""
    wf = ConfigWorkflow(config_file=[GENERATE], meta_file="configs/metadata.json", logging_file=False,
                        workflow_type=None)
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    message = str(err.value.__cause__)
    assert message.startswith(f"the workflow config is merged after {COMMON}: config_file=['{COMMON}', ")
    assert "\n" not in message
    check_layering({"flag": True, "node": {"value": "@flag"}})


def _documented_config_lists() -> list[tuple[str, str]]:
    """(where, text) of every list of config files and every bare ``--config_file configs/...`` that the READMEs,
    the configs' comments and the Python sources show."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*"),
                                        *(ROOT / "scripts").rglob("*.py"), ROOT / "main.py"] if p.is_file()}
    texts.update({p: json.loads(p.read_text()).get("_comment", "") for p in (ROOT / "configs").glob("*.json")})
    found = []
    for path, text in texts.items():
        where = str(path.relative_to(ROOT))
        found += [(where, m) for m in re.findall(r"\[\\?'configs/[^\]]*\]", text)]
        found += [(where, m) for m in re.findall(r"--config_file (configs/\S+)", text)]
    return found


def test_every_documented_workflow_merges_common_json_first():
    documented = _documented_config_lists()
    assert len(documented) > 40
    wrong = [(where, text) for where, text in documented if not re.match(r"\[\\?'configs/common\.json'", text)]
    assert not wrong, f"config lists that do not start with configs/common.json: {wrong}"
