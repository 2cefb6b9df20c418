"""MONAI bundle conventions: metadata schema, network in/out shapes, workflow properties, one definition per network
(configs/common.json merged first, workflow configs holding only their own keys), every config id read by something."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.properties import InferProperties, MetaProperties, TrainProperties
from monai.bundle.reference_resolver import ReferenceResolver

from scripts.checks import config_strings, top_id
from tests.forked_python import run_python
from tests.helpers import ROOT, fake_brats, metadata_schema, overrides_for

COMMON, TRAIN_AE, TRAIN_DIFF = "configs/common.json", "configs/train_autoencoder.json", "configs/train_diffusion.json"
INFER_AE, GENERATE, EVALUATE = "configs/inference_autoencoder.json", "configs/inference.json", "configs/evaluate.json"
VQVAE, BRATS = "configs/vqvae.json", "configs/brats.json"
MULTI_AE, MULTI_DIFF = "configs/multi_gpu_train_autoencoder.json", "configs/multi_gpu_train_diffusion.json"
TRAIN_CN, INFER_CN = "configs/train_controlnet.json", "configs/inference_controlnet.json"
TRAIN_CONCAT, INFER_CONCAT = "configs/train_diffusion_label_concat.json", "configs/inference_label_concat.json"
INFER_LAYOUT, TRAIN_LAYOUT = "configs/inference_layout.json", "configs/train_layout.json"
TRAIN_COND, GENERATE_COND = "configs/train_diffusion_conditional.json", "configs/inference_conditional.json"

#: the workflow configs, each merged after common.json (the overlays come after them)
WORKFLOW_CONFIGS = [TRAIN_AE, TRAIN_DIFF, INFER_AE, GENERATE, EVALUATE]
#: shared ids a workflow config defines for itself: MONAI's infer property network_def is the workflow's own network
#: (the reconstruction wrapper, the feature network); generation takes the noise schedule, spacing and orientation
#: from the training record (common.json's defaults, read by its nested `recipe` entries, for weights without one)
OWN_SHARED_IDS = {INFER_AE: {"network_def"}, EVALUATE: {"network_def"}}

#: every workflow the README and the configs' comments show: name -> (config files, MONAI workflow type, data kind
#: of tests.helpers.overrides_for)
ALL_WORKFLOWS = {
    "stage1": ([COMMON, TRAIN_AE], "train", "train"),
    "reconstruction": ([COMMON, INFER_AE], "infer", "infer"),
    "stage2": ([COMMON, TRAIN_DIFF], "train", "stage2"),
    "stage2_after_stage1": ([COMMON, TRAIN_AE, TRAIN_DIFF], "train", "stage2"),  # the Model Zoo BraTS layering
    "generation": ([COMMON, GENERATE], "infer", "generate"),
    "evaluation": ([COMMON, EVALUATE], "infer", "infer"),
    "vqvae_stage1": ([COMMON, TRAIN_AE, VQVAE], "train", "train"),
    "vqvae_reconstruction": ([COMMON, INFER_AE, VQVAE], "infer", "infer"),
    "vqvae_stage2": ([COMMON, TRAIN_DIFF, VQVAE], "train", "stage2"),
    "vqvae_stage2_after_stage1": ([COMMON, TRAIN_AE, VQVAE, TRAIN_DIFF], "train", "stage2"),
    "vqvae_generation": ([COMMON, GENERATE, VQVAE], "infer", "generate"),
    "brats_stage1": ([COMMON, TRAIN_AE, BRATS], "train", "train"),
    "brats_reconstruction": ([COMMON, INFER_AE, BRATS], "infer", "infer"),
    "brats_stage2": ([COMMON, TRAIN_DIFF, BRATS], "train", "stage2"),
    "brats_generation": ([COMMON, GENERATE, BRATS], "infer", "generate"),
    "multi_gpu_stage1": ([COMMON, TRAIN_AE, MULTI_AE], "train", "train"),
    "multi_gpu_stage2": ([COMMON, TRAIN_DIFF, MULTI_DIFF], "train", "stage2"),
    "multi_gpu_stage2_after_stage1": ([COMMON, TRAIN_AE, TRAIN_DIFF, MULTI_AE, MULTI_DIFF], "train", "stage2"),
    "controlnet": ([COMMON, TRAIN_DIFF, TRAIN_CN], "train", "stage2"),
    "label_concat_stage2": ([COMMON, TRAIN_DIFF, TRAIN_CONCAT], "train", "stage2"),
    "synthesis": ([COMMON, GENERATE, INFER_CN], "infer", "generate"),
    "synthesis_concat": ([COMMON, GENERATE, INFER_CN, INFER_CONCAT], "infer", "generate"),
    "layout": ([COMMON, GENERATE, INFER_CN, INFER_LAYOUT], "infer", "generate"),
    "layout_attention": ([COMMON, GENERATE, INFER_LAYOUT], "infer", "generate"),
    "layout_training": ([COMMON, TRAIN_DIFF, TRAIN_LAYOUT], "train", "stage2"),
    "conditional_stage2": ([COMMON, TRAIN_DIFF, TRAIN_COND], "train", "stage2"),
    "conditional_generation": ([COMMON, GENERATE, GENERATE_COND], "infer", "generate"),
}
#: label-map workflows read the vocabulary and the UNet they build on from the records of earlier trainings
LABEL_RECORDS = {TRAIN_CN, INFER_CN, TRAIN_LAYOUT}


@pytest.fixture(autouse=True)
def _bundle_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths and macros are relative to the bundle root, as for `monai.bundle run`


def _cli(*args):
    return run_python(["-m", "monai.bundle", *args], cwd=ROOT)


def test_metadata_verifies_against_schema():
    schema = metadata_schema()  # skips without ../shared, fails instead under CI
    proc = _cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_verify_net_in_out_reconstruction():
    """`network_data_format` describes the served reconstruction network (image in, image out), what MONAI Label
    reads for the task's input and output."""
    proc = _cli("verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
                "--config_file", "['configs/common.json','configs/inference_autoencoder.json']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_verify_net_in_out_diffusion_unet():
    """`diffusion_data_format` describes the diffusion UNet (latent in, latent out, through a fixed-timestep wrapper),
    checked by pointing verify_net_in_out at it."""
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    proc = _cli("verify_net_in_out", "--net_id", "denoiser_def", "--meta_file", "configs/metadata.json",
                "--config_file", "['configs/common.json','configs/inference.json']",
                "--_meta_#network_data_format", json.dumps(meta["diffusion_data_format"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo data for the tiny workflows, and a fake Decathlon BraTS folder for the brats overlay."""
    tmp = tmp_path_factory.mktemp("properties_data")
    fake_brats(tmp / "data", n=6)
    return tmp / "data"


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process Gloo group, so that the multi-GPU overlays' DistributedSamplers build in-process."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _save_untrained_autoencoder(wf, models: Path) -> None:
    """Stage 2 encodes its latents while its properties resolve: give it (untrained) autoencoder weights."""
    parser = ConfigParser(wf.parser.get())
    parser.parse()
    models.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), models / "model_autoencoder.pt")


def _save_label_records(wf, models: Path) -> None:
    """The records the label-map workflows read: the stage-2 UNet (untrained) with its record, and the ControlNet's
    record with the vocabulary (the concat UNet's record holds it too)."""
    parser = ConfigParser(wf.parser.get())
    parser.parse()
    models.mkdir(parents=True, exist_ok=True)
    vocabulary = parser["label_classes"] if isinstance(parser["label_classes"], dict) else {"1": "brain"}
    torch.save({}, models / "model_ema.pt")
    (models / "model_record.json").write_text(json.dumps({"scale_factor": 1.0, "label_classes": vocabulary}))
    (models / "model_controlnet_record.json").write_text(json.dumps({"label_classes": vocabulary,
                                                                       "controlnet_embedding_width": 16}))


@pytest.mark.parametrize("name", list(ALL_WORKFLOWS))
def test_every_workflow_passes_check_properties(name, data, tmp_path, request):
    """MONAI's required properties of each workflow's type exist and resolve (train: trainer, datasets, handlers
    as dicts; infer: dataset, evaluator, inferer, network_def), for the plain workflows and their overlays."""
    files, workflow_type, kind = ALL_WORKFLOWS[name]
    if MULTI_AE in files or MULTI_DIFF in files:
        request.getfixturevalue("single_process_group")
    ov = overrides_for(tmp_path, infer=kind == "infer", generate=kind == "generate", stage2=kind == "stage2",
                       dataset_dir=str(data), demo_data_dir=str(data / "demo"), demo_num_subjects=6)
    if BRATS in files:  # its Decathlon datalists, with the tiny networks
        ov.pop("demo_data_dir")
        ov["diffusion_attention_levels"] = [False, False, True]
    else:
        ov["dataset_dir"] = ov["demo_data_dir"]
    if kind == "generate":
        ov["scale_factor"] = 1.0  # no stage-2 checkpoint to read it from
    if GENERATE_COND in files:  # the conditions come from the training record
        record = tmp_path / "model_record.json"
        record.write_text(json.dumps({"conditions": [{"name": "lesion_count", "kind": "continuous", "drop_prob": 0.1,
                                                      "mean": 1.0, "std": 1.0, "min": 0.0, "max": 3.0}]}))
        ov["training_record_path"] = str(record)
    # bundle_root in tmp_path: resolving the trainer writes a run folder, never into the checkout
    wf = ConfigWorkflow(config_file=files, meta_file="configs/metadata.json", logging_file=False,
                        workflow_type=workflow_type, bundle_root=str(tmp_path), **ov)
    if kind == "stage2":
        _save_untrained_autoencoder(wf, tmp_path / "models")
    if LABEL_RECORDS & set(files):
        _save_label_records(wf, tmp_path / "models")
    wf.parser.parse()  # properties are checked on the parsed config; the initialize expressions need weights
    wf._is_initialized = True
    assert wf.check_properties() == []


def test_no_config_repeats_a_shared_definition_as_a_top_level_macro():
    """common.json is merged first, so no config takes a shared id again with a top-level '%configs/common.json#<id>'
    macro (generation's `recipe#<id>` reads of the raw defaults are reads, not repeats): adding a
    shared definition touches common.json only."""
    repeats = [f"{path.name}: {key}" for path in sorted((ROOT / "configs").glob("*.json")) if path.name != "common.json"
               for key, value in json.loads(path.read_text()).items()
               if isinstance(value, str) and value.startswith("%configs/common.json")]
    assert not repeats, f"top-level macros of common.json ids (merge common.json first instead): {repeats}"


@pytest.mark.parametrize("config_file", WORKFLOW_CONFIGS)
def test_workflow_configs_hold_only_their_own_keys(config_file):
    """A workflow config redefines no shared id of common.json except its own (:data:`OWN_SHARED_IDS`, and
    generation's recorded settings, which fall back to common.json's defaults through `recipe`)."""
    common = json.loads((ROOT / COMMON).read_text())
    workflow = json.loads((ROOT / config_file).read_text())
    recipe = workflow.get("recipe", {}) if config_file == GENERATE else {}
    own = OWN_SHARED_IDS.get(config_file, set()) | set(recipe)
    redefined = [k for k in workflow if k in common and k not in own and not k.startswith("_")]
    assert not redefined, f"{config_file} redefines shared ids of common.json: {redefined}"
    for key in recipe:
        assert recipe[key] == f"$scripts.checks.common_default('{key}')", \
            f"{config_file}: 'recipe#{key}' must read common.json"
        assert f"'{key}', @recipe#{key})" in workflow[key], f"{config_file}: '{key}' must fall back to the recipe"
    # without common.json, the first initialize step still runs (and names the fix, tests/test_layering.py)
    assert workflow.get("+imports") == ["$import scripts"]
    assert workflow["initialize"][0] == "$scripts.checks.check_overrides()"


def test_train_and_inference_build_the_same_autoencoder():
    nets = []
    for config_file in (TRAIN_AE, INFER_AE, GENERATE):
        parser = ConfigParser()
        parser.read_config([COMMON, config_file])
        parser.parse()
        nets.append(parser.get_parsed_content("autoencoder_def"))
    a = nets[0].state_dict()
    for other in (n.state_dict() for n in nets[1:]):
        assert list(a) == list(other) and all(a[k].shape == other[k].shape for k in a)


def test_stage2_training_and_generation_build_the_same_unet():
    nets = []
    for files in ([COMMON, TRAIN_DIFF], [COMMON, TRAIN_AE, TRAIN_DIFF], [COMMON, GENERATE]):
        parser = ConfigParser()
        parser.read_config(files)
        parser.parse()
        nets.append(parser.get_parsed_content("network_def").state_dict())
    for other in nets[1:]:
        assert list(other) == list(nets[0]) and all(other[k].shape == nets[0][k].shape for k in other)


# ---- every top-level id is read by something ----------------------------------------------------------------------

#: what MONAI itself runs or reads: the workflow's entry points
ENTRY_POINTS = {"imports", "initialize", "run", "finalize", "+imports", "+initialize", "+finalize"}
#: read by main.py (scripts/launch.py): the test workflow of a training run and the torchrun overlay
LAUNCHER_KEYS = ("test_config", "multi_gpu_overlay")
#: settings every workflow must act on when it accepts them (a workflow that ignores --amp must not take it)
RUNTIME_SETTINGS = ("amp", "amp_dtype", "device")
#: ids read by nothing else, with the reason they exist
ALLOWED_UNREAD: dict[str, str] = {}


def _read_ids(files) -> tuple[set[str], set[str]]:
    """(top-level ids, ids referenced by another top-level id) of the merged, macro-resolved config."""
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser.resolve_macro_and_relative_ids()
    config = parser.get()
    read = {top_id(ref) for key, value in config.items() for s in config_strings(value)
            for ref in ReferenceResolver.match_refs_pattern(s) if top_id(ref) != key}
    return set(config), read


def _property_ids(workflow_type: str) -> set[str]:
    """Top-level ids of MONAI's bundle properties of ``workflow_type`` (read through ``ConfigWorkflow``)."""
    properties = {**MetaProperties, **(TrainProperties if workflow_type == "train" else InferProperties)}
    return {top_id(p["id"]) for p in properties.values()}


def _documented_net_ids() -> set[str]:
    """Ids named by the documented ``--net_id`` commands (``verify_net_in_out``, ``ckpt_export``)."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "README.md").read_text()
    return set(re.findall(r"--net_id (\w+)", text))


def _is_read(key: str, workflow: str) -> bool:
    files, workflow_type, _ = ALL_WORKFLOWS[workflow]
    return key in READS[workflow] or key in _property_ids(workflow_type)


READS = {name: _read_ids(files)[1] for name, (files, _, _) in ALL_WORKFLOWS.items()}


def test_launcher_keys_are_read_by_the_launcher():
    launch = (ROOT / "scripts" / "launch.py").read_text()
    assert all(f'"{key}"' in launch for key in LAUNCHER_KEYS)


@pytest.mark.parametrize("config_file", [TRAIN_AE, TRAIN_DIFF, INFER_AE, GENERATE, EVALUATE, VQVAE, BRATS, MULTI_AE,
                                         MULTI_DIFF, TRAIN_COND, GENERATE_COND, TRAIN_CN, INFER_CN, TRAIN_CONCAT,
                                         INFER_CONCAT, INFER_LAYOUT, TRAIN_LAYOUT])
def test_every_id_a_config_defines_is_read_by_a_workflow_using_it(config_file):
    """Each top-level id a config file defines (not a nested '#' edit of an overlay) is referenced by another id in
    some workflow that merges the file, or is an entry point, a MONAI property of that workflow's type, a key main.py
    reads, or a documented --net_id (a '+' merge into an id, e.g. '+synthesize', counts as that id)."""
    content = json.loads((ROOT / config_file).read_text())
    own = [k if k in ENTRY_POINTS else k.removeprefix("+") for k in content if not k.startswith("_") and "#" not in k]
    users = [name for name, (files, _, _) in ALL_WORKFLOWS.items() if config_file in files]
    exempt = ENTRY_POINTS | set(LAUNCHER_KEYS) | _documented_net_ids() | set(ALLOWED_UNREAD)
    unread = [k for k in own if k not in exempt and not any(_is_read(k, w) for w in users)]
    assert not unread, f"{config_file}: ids no workflow reads (use, drop, or allow them with a reason): {unread}"


def test_every_shared_definition_is_read_by_some_workflow():
    common = [k for k in json.loads((ROOT / COMMON).read_text()) if not k.startswith("_") and k not in ENTRY_POINTS]
    unread = [k for k in common if not any(_is_read(k, w) for w in ALL_WORKFLOWS)]
    assert not unread, f"configs/common.json ids that no workflow reads: {unread}"


@pytest.mark.parametrize("name", list(ALL_WORKFLOWS))
def test_every_workflow_acts_on_the_runtime_settings_it_accepts(name):
    defined, read = _read_ids(ALL_WORKFLOWS[name][0])
    ignored = [k for k in RUNTIME_SETTINGS if k in defined and k not in read]
    assert not ignored, f"{name} accepts {ignored} on the command line and uses none of them"
