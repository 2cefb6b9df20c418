"""Label-map control: the vocabulary and its refusals, the ControlNet's no-op start, the training objective (class
drops, weighting), the control check, and the train -> synthesise workflow writing image + label pairs on the input
map's own grid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from scripts import controlnet as cn
from scripts.nifti import centered_affine, save_nifti
from scripts.sampling import LatentDiffusionPipeline
from scripts.storage import file_sha256
from tests.helpers import COMMON, ROOT, TWO_LEVEL_AUTOENCODER, TWO_LEVEL_UNET, config_network, overrides_for, run_bundle

CLASSES = {"1": "brain", "2": "ventricles", "3": "lesion"}
STAGE1 = [COMMON, "configs/train_autoencoder.json"]
STAGE2 = [COMMON, "configs/train_diffusion.json"]
CONTROLNET = [*STAGE2, "configs/train_controlnet.json"]
SYNTHESIS = [COMMON, "configs/inference.json", "configs/inference_controlnet.json"]


def label_chain(volume_size=(16, 16, 16)):
    """The bundle's label preprocessing (configs/common.json), on a small grid."""
    from monai.transforms import Compose

    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / COMMON)]))
    parser.update({"volume_size": list(volume_size)})
    return Compose(parser.get_parsed_content("label_preprocessing_transforms"))


class refused:
    """``pytest.raises`` for the bundle's own error under MONAI's ``RuntimeError("applying transform ...")``."""

    def __init__(self, kind, match):
        self.kind, self.match = kind, match

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        while exc is not None and not isinstance(exc, self.kind):
            exc = exc.__cause__
        assert exc is not None, f"no {self.kind.__name__} raised"
        assert re.search(self.match, str(exc)), str(exc)
        return True


def write_map(path: Path, array: np.ndarray, spacing=(3.0, 3.0, 3.0), orientation="RAS") -> str:
    save_nifti(array, centered_affine(array.shape, spacing, orientation), path, dtype=np.int16)
    return str(path)


def test_vocabulary_is_checked_and_normalised():
    assert cn.label_vocabulary({"3": "lesion", "1": "brain"}) == {1: "brain", 3: "lesion"}
    with pytest.raises(ValueError, match=r"label_classes: label value '0' is not an integer >= 1"):
        cn.label_vocabulary({"0": "background"})
    with pytest.raises(ValueError, match=r"label value 'x' is not an integer"):
        cn.label_vocabulary({"x": "brain"})
    with pytest.raises(ValueError, match=r"class names \['brain'\] are given to several label values"):
        cn.label_vocabulary({"1": "brain", "2": "brain"})
    with pytest.raises(ValueError, match="label value 2 has no class name"):
        cn.label_vocabulary({"1": "brain", "2": ""})


def test_bad_label_maps_are_refused_naming_the_file(tmp_path):
    chain = label_chain()
    good = np.zeros((16, 16, 16), np.int16)
    good[4:12, 4:12, 4:12] = 1
    out = chain({"label": write_map(tmp_path / "good.nii.gz", good)})["label"]
    assert tuple(out.shape) == (1, 16, 16, 16) and set(np.unique(out.numpy())) == {0.0, 1.0}

    unknown = good.copy()
    unknown[0, 0, 0], unknown[1, 1, 1] = 7, 9
    with refused(ValueError, match=r"label map .*unknown.nii.gz holds values \[7, 9\] that are not in "
                                         r"label_classes .*remap them to 0 or add them to label_classes"):
        chain({"label": write_map(tmp_path / "unknown.nii.gz", unknown)})
    with refused(ValueError, match=r"label map .*empty.nii.gz is empty \(background only\)"):
        chain({"label": write_map(tmp_path / "empty.nii.gz", np.zeros((16, 16, 16), np.int16))})
    two_channels = np.stack([good, good], -1)
    nib.save(nib.Nifti1Image(two_channels, np.eye(4)), tmp_path / "4d.nii.gz")
    with refused(ValueError, match=r"label map .*4d.nii.gz: shape .* is not one 3D volume"):
        chain({"label": str(tmp_path / "4d.nii.gz")})
    fractional = good.astype(np.float32) * 0.5
    save_nifti(fractional, np.eye(4), tmp_path / "float.nii.gz")
    with refused(ValueError, match=r"float.nii.gz holds non-integer values"):
        chain({"label": str(tmp_path / "float.nii.gz")})


def test_a_map_that_cannot_be_resampled_to_the_training_grid_is_refused(tmp_path):
    from scripts.synthesis import load_label_map

    one_slice = np.zeros((16, 16, 1), np.int16)
    one_slice[4:12, 4:12] = 1
    path = write_map(tmp_path / "slice.nii.gz", one_slice)
    with pytest.raises(ValueError, match=r"slice.nii.gz covers only \[48.0, 48.0, 3.0\] mm .*cannot be resampled"):
        load_label_map(path, label_chain(), [3.0, 3.0, 3.0])
    raw, prepared = load_label_map(write_map(tmp_path / "ok.nii.gz", np.repeat(one_slice, 4, 2)), label_chain(),
                                   [3.0, 3.0, 3.0])
    assert tuple(raw.shape) == (1, 16, 16, 4) and tuple(prepared.shape) == (1, 16, 16, 16)


def tiny_controlled_pipeline(seed=0):
    autoencoder = config_network("autoencoder_def", TWO_LEVEL_AUTOENCODER, seed=seed).eval()
    unet = config_network("network_def", TWO_LEVEL_UNET, seed=seed).eval()
    with torch.no_grad():  # MONAI zero-initialises the UNet's output layer: give it the non-zero output of training
        for p in unet.out.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed))
    overrides = {**TWO_LEVEL_UNET, **TWO_LEVEL_AUTOENCODER, "label_classes": CLASSES}
    controlnet = cn.init_from_unet(config_network("controlnet_def", overrides, seed=seed), unet).eval()
    return unet, controlnet, autoencoder


def test_controlnet_starts_as_a_no_op():
    """Zero-initialised outputs: before training, a controlled pipeline samples exactly what the plain one does."""
    from scripts.synthesis import controlled_denoiser

    unet, controlnet, autoencoder = tiny_controlled_pipeline()
    plain = LatentDiffusionPipeline(unet, DDIMScheduler(num_train_timesteps=50), autoencoder, 1.0, 3)
    controlled = LatentDiffusionPipeline(unet, DDIMScheduler(num_train_timesteps=50), autoencoder, 1.0, 3,
                                         controlnet=controlnet)
    label = torch.zeros(1, 1, 16, 16, 16)
    label[:, :, 4:12, 4:12, 4:12] = 1
    label[:, :, 7:9, 7:9, 7:9] = 3
    control = cn.control_image(label, [1, 2, 3])
    noise = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = plain.sample(noise, progress=False)
    torch.testing.assert_close(controlled.sample(noise, control=control, progress=False), expected)
    from scripts.sampling import reverse_process

    guided = controlled_denoiser(controlled, control, cn.null_control(control, [1, 2, 3], [3]), 3.0)
    torch.testing.assert_close(reverse_process(guided, controlled.scheduler, noise, 3, progress=False), expected)
    # and a trained ControlNet (non-zero outputs) does change the samples
    with torch.no_grad():
        for p in controlnet.controlnet_mid_block.parameters():
            p.add_(0.05)
    assert not torch.allclose(controlled.sample(noise, control=control, progress=False), expected)


def test_objective_drops_classes_and_whole_controls_at_their_rates():
    prepare = cn.ControlNetPrepareBatch(DDPMScheduler(num_train_timesteps=100), 1.0, CLASSES,
                                        label_drop_prob={"lesion": 0.5}, control_drop_prob=0.2)
    n = 400
    label = torch.zeros(n, 1, 4, 4, 4)
    label[:, :, :2] = 1
    label[:, :, 2:, :2] = 2
    label[:, :, 2:, 2:] = 3
    batch = {"z_mu": torch.zeros(n, 2, 2, 2, 2), "z_sigma": torch.zeros(n, 2, 2, 2, 2), "label": label}
    torch.manual_seed(0)
    _, _, _, kwargs = prepare(batch)
    control = kwargs["control"]
    assert control.shape == (n, 3, 4, 4, 4)
    present = control.flatten(2).amax(2)  # (n, classes): 1 where the class is kept
    whole = present.sum(1) == 0
    assert abs(float(whole.float().mean()) - 0.2) < 0.06
    kept = present[~whole]
    assert float(kept[:, 0].mean()) == 1.0 and float(kept[:, 1].mean()) == 1.0
    assert abs(float(kept[:, 2].mean()) - 0.5) < 0.08
    # the validator's generator makes the drops reproducible
    a = prepare(batch, generator=torch.Generator().manual_seed(3))[3]["control"]
    b = prepare(batch, generator=torch.Generator().manual_seed(3))[3]["control"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"label_drop_prob names classes \['tumour'\]"):
        cn.ControlNetPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, CLASSES, label_drop_prob={"tumour": 1})


def test_class_weighting_counts_small_structures_more():
    prepare = cn.ControlNetPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, CLASSES)
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., :4, :, :] = 3  # the lesion covers the first half of the latent grid below
    prepare.last_control = cn.control_image(label, [1, 2, 3])
    target = torch.zeros(1, 2, 4, 4, 4)
    error_in_lesion = target.clone()
    error_in_lesion[:, :, :2] = 1.0
    error_outside = target.clone()
    error_outside[:, :, 2:] = 1.0
    plain = cn.ClassWeightedMSE(prepare)
    assert float(plain(error_in_lesion, target)) == pytest.approx(float(plain(error_outside, target))) == 0.5
    weighted = cn.ClassWeightedMSE(prepare, {"lesion": 4.0})
    assert float(weighted(error_in_lesion, target)) == pytest.approx(4 * float(weighted(error_outside, target)))


def test_control_check_on_a_real_phantom_and_its_own_map(tmp_path):
    """The floor of the control check: the known-truth segmentation of a real demo phantom against its own label."""
    from monai.transforms import Compose

    from scripts.demo_data import make_demo_dataset

    path = make_demo_dataset(str(tmp_path), num_subjects=2, size=64, spacing=3.0, seed=5, num_validation=0,
                             num_test=0)
    entry = json.loads(Path(path).read_text())["training"][0]
    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / COMMON)]))
    image = Compose(parser.get_parsed_content("preprocessing_transforms"))({"image": str(tmp_path / entry["image"])})
    label = label_chain((64, 64, 64))({"label": str(tmp_path / entry["label"])})["label"]
    check = cn.control_check(image["image"].numpy(), label.numpy(), cn.label_vocabulary(CLASSES), [3.0] * 3)
    assert check["brain"]["dice"] > 0.85 and check["ventricles"]["dice"] > 0.6, check
    noise = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    assert cn.control_check(noise, label.numpy(), cn.label_vocabulary(CLASSES), [3.0] * 3)["brain"]["dice"] < 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controlnet")
    run_bundle(STAGE1, overrides_for(tmp, max_epochs=1, val_interval=5, lr=1e-3))
    stage2 = overrides_for(tmp, stage2=True, max_epochs=1, val_interval=5, train_batch_size=2, val_batch_size=2,
                           preview_num_samples=1, preview_steps=2, lr_warmup_iterations=2)
    run_bundle(STAGE2, stage2)
    unet_files = {name: file_sha256(tmp / "models" / name) for name in ("model.pt", "model_ema.pt",
                                                                          "model_record.json")}
    ov = {**stage2, "val_interval": 1, "label_drop_prob": {"lesion": 0.5}, "class_loss_weights": {"lesion": 4.0}}
    proc = run_bundle(CONTROLNET, ov)
    return tmp, unet_files, proc


def test_controlnet_training_writes_its_own_files_and_vocabulary(trained):
    tmp, unet_files, proc = trained
    models = tmp / "models"
    for name in ("model_controlnet.pt", "model_controlnet_ema.pt", "model_controlnet_best.pt",
                 "checkpoint_controlnet.pt", "model_controlnet_record.json"):
        assert (models / name).is_file(), name
    assert {name: file_sha256(models / name) for name in unet_files} == unet_files, "the UNet's files are untouched"
    record = json.loads((models / "model_controlnet_record.json").read_text())
    assert record["label_classes"] == CLASSES and record["label_drop_prob"] == {"lesion": 0.5}
    assert record["diffusion_sha256"] == unet_files["model_ema.pt"]
    state = torch.load(models / "checkpoint_controlnet.pt", weights_only=True)
    assert {"controlnet", "ema", "optimizer", "record"} <= set(state)
    assert any(k.startswith("controlnet_cond_embedding") for k in state["controlnet"])
    assert list((tmp / "outputs").glob("train_controlnet_*/loss_curves.png"))


def test_synthesis_writes_pairs_on_the_input_maps_grid(trained, tmp_path):
    """A map given on an LPS, anisotropic grid (not the training's RAS 3 mm) comes back as an image + label pair on
    that very grid and affine; a map on the training grid is not resampled."""
    tmp, _, _ = trained
    entry = json.loads((tmp / "data" / "datalist.json").read_text())["test"][0]
    src = nib.load(tmp / "data" / entry["label"])
    label = np.asarray(src.dataobj).astype(np.int16)
    lps = np.ascontiguousarray(label[::-1, ::-1, :24])  # voxel axes left, posterior, superior; 4 mm slices
    affine = centered_affine(lps.shape, (3.0, 3.0, 4.0), "LPS")
    affine[:3, 3] += [10.0, -5.0, 20.0]  # an origin away from the centre
    lps_path = str(tmp_path / "lps_map.nii.gz")
    nib.save(nib.Nifti1Image(lps, affine), lps_path)
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, samples_per_map=2, control_guidance_scale=2.0,
                       null_classes=["lesion"], label_maps=[lps_path, str(tmp / "data" / entry["label"])])
    proc = run_bundle(SYNTHESIS, ov)
    run = sorted((tmp / "outputs").glob("synthesis_*"))[-1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["samples"]) == 4 and manifest["network_calls_per_step"] == 2
    assert manifest["unconditional_branch"] == "the map without ['lesion']"
    given = nib.load(lps_path)
    for sample in manifest["samples"]:
        image, pair = nib.load(run / sample["image"]), nib.load(run / sample["label"])
        reference = given if sample["label_map"] == lps_path else src
        assert image.shape == pair.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine, atol=1e-5)
        np.testing.assert_allclose(pair.affine, reference.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(pair.dataobj), np.asarray(reference.dataobj))
        assert sample["resampled"] is (sample["label_map"] == lps_path)
        assert set(sample["control_check"]) == {"brain", "ventricles", "lesion"}
    assert (run / "samples.png").stat().st_size > 5000 and "control check (mean Dice)" in proc.stdout
    assert set(manifest["control_check_summary"]) == {"brain", "ventricles", "lesion"}


def test_synthesis_refuses_unknown_label_values_and_a_missing_record(trained, tmp_path):
    tmp, _, _ = trained
    bad = np.zeros((32, 32, 32), np.int16)
    bad[8:24, 8:24, 8:24] = 1
    bad[10, 10, 10] = 5
    path = write_map(tmp_path / "bad_map.nii.gz", bad)
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, label_maps=[path])
    proc = run_bundle(SYNTHESIS, ov, check=False)
    assert proc.returncode != 0
    assert "bad_map.nii.gz holds values [5] that are not in label_classes" in proc.stdout + proc.stderr
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, label_maps=[path],
                       controlnet_record_path=str(tmp_path / "nowhere.json"))
    proc = run_bundle(SYNTHESIS, ov, check=False)
    assert proc.returncode != 0
    assert "no model_controlnet_record.json with label_classes beside" in proc.stdout + proc.stderr


def test_concat_mode_gives_the_map_at_latent_resolution_through_the_condition_slot():
    prepare = cn.ControlNetPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, CLASSES, control_drop_prob=0.0,
                                        as_condition=True)
    label = torch.zeros(2, 1, 8, 8, 8)
    label[:, :, :4] = 1
    label[:, :, 4:, :4] = 3
    batch = {"z_mu": torch.zeros(2, 2, 4, 4, 4), "z_sigma": torch.zeros(2, 2, 4, 4, 4), "label": label}
    _, _, _, kwargs = prepare(batch)
    assert "control" not in kwargs and kwargs["mode"] == "concat"
    assert kwargs["condition"].shape == (2, 3, 4, 4, 4)
    torch.testing.assert_close(kwargs["condition"].sum(1)[:, :2], torch.ones(2, 2, 4, 4))  # brain half: fraction 1
    assert float(kwargs["condition"][:, 2].mean()) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="the label map takes the condition slot in concat mode"):
        cn.ControlNetPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, CLASSES, as_condition=True,
                                  condition_name="age")


def test_concat_mode_trains_and_synthesises(trained, tmp_path):
    """The UNet trained with the label map from the start (concat mode) records its vocabulary, and synthesis from a
    map runs without a ControlNet."""
    tmp, _, _ = trained
    models = tmp_path / "models"
    models.mkdir()
    (models / "model_autoencoder.pt").write_bytes((tmp / "models" / "model_autoencoder.pt").read_bytes())
    ov = overrides_for(tmp, stage2=True, max_epochs=1, val_interval=5, train_batch_size=2, val_batch_size=2,
                       lr_warmup_iterations=2, ckpt_dir=str(models), output_dir=str(tmp_path / "outputs"))
    run_bundle([*STAGE2, "configs/train_diffusion_label_concat.json"], ov)
    record = json.loads((models / "model_record.json").read_text())
    assert record["label_control"] == "concat" and record["label_classes"] == CLASSES
    state = torch.load(models / "model.pt", weights_only=True)
    assert state["conv_in.conv.weight"].shape[1] == 4 + 3  # latent channels + one per class
    label = str(tmp / "data" / json.loads((tmp / "data" / "datalist.json").read_text())["test"][0]["label"])
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, control_guidance_scale=2.0, label_maps=[label],
                       ckpt_dir=str(models), output_dir=str(tmp_path / "outputs"))
    run_bundle([*SYNTHESIS, "configs/inference_label_concat.json"], ov)
    manifest = json.loads((max((tmp_path / "outputs").glob("synthesis_*")) / "manifest.json").read_text())
    assert manifest["label_control"] == "concat" and manifest["controlnet"] is False
    assert manifest["network_calls_per_step"] == 2 and len(manifest["samples"]) == 1


def test_metadata_states_the_configured_vocabulary():
    metadata = json.loads((ROOT / "configs" / "metadata.json").read_text())
    vocabulary = json.loads((ROOT / COMMON).read_text())["label_classes"]
    channels = metadata["controlnet_data_format"]["inputs"]["label"]["channel_def"]
    assert channels == {"0": "background", **vocabulary}


def test_layout_boxes_painted_onto_a_base_map_generate_through_the_controlnet(trained, tmp_path):
    """configs/inference_layout.json: a layout's lesion box (world mm) painted onto a base label map, generated
    through the ControlNet; the instance map (one id per box) lies on the base map's grid and affine, and every
    sample carries its box check."""
    tmp, _, _ = trained
    base = str(tmp / "data" / json.loads((tmp / "data" / "datalist.json").read_text())["test"][0]["label"])
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"space": "mm", "boxes": [
        {"class": "lesion", "center": [0.0, 10.0, 5.0], "size": [9.0, 9.0, 9.0], "shape": "ellipsoid"}]}))
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, layouts=[str(layout)], paste_onto=base)
    proc = run_bundle([*SYNTHESIS, "configs/inference_layout.json"], ov)
    run = max((tmp / "outputs").glob("layout_*"))
    instances = nib.load(run / "layout_0000_instances.nii.gz")
    np.testing.assert_allclose(instances.affine, nib.load(base).affine, atol=1e-5)
    assert set(np.unique(np.asarray(instances.dataobj))) == {0, 1}
    assert json.loads((run / "layout_0000_instances.json").read_text())["instances"] == {"1": "lesion"}
    painted = np.asarray(nib.load(run / "layout_0000_painted.nii.gz").dataobj)
    assert (painted[np.asarray(instances.dataobj) == 1] == 3).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["samples"][0]["box_check"]["boxes"][0]["class"] == "lesion"
    assert set(manifest["box_check_summary"]) == {"box_recall", "mean_iou", "samples_with_lesions_outside_boxes"}
    assert "box recall" in proc.stdout
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, layouts=[str(layout)])
    proc = run_bundle([*SYNTHESIS, "configs/inference_layout.json"], ov, check=False)
    assert proc.returncode != 0 and "give --paste_onto <label map>" in proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", ["configs/train_controlnet.json", "configs/train_diffusion_label_concat.json",
                                     "configs/train_layout.json"])
def test_overlays_edit_the_handlers_they_mean(overlay):
    """The label-map overlays edit stage 2's handlers by position: the positions still hold those handlers."""
    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / f) for f in [*STAGE2, overlay]]))
    edits = [k for k in json.loads((ROOT / overlay).read_text()) if "#handlers#" in k]
    expected = {"train#handlers#3": "scripts.handlers.TrainingCheckpoint",
                "train#handlers#6": "scripts.handlers.LossCurves", "train#handlers#7": "scripts.handlers.ProgressBar",
                "validate#handlers#3": "scripts.handlers.SamplePreview"}
    for key in edits:
        position = "#".join(key.split("#")[:3])
        assert parser[f"{position}#_target_"] == expected[position], key


def test_a_batch_without_its_label_map_is_refused_naming_the_key():
    from scripts.controlnet import batch_label_map

    label = batch_label_map({"label": np.zeros((1, 1, 4, 4, 4), dtype=np.uint8)}, "label", torch.device("cpu"), "x")
    assert isinstance(label, torch.Tensor) and label.shape == (1, 1, 4, 4, 4)
    for what in ("ControlNet", "layout"):
        with pytest.raises(KeyError, match=f"the {what} batch has no 'seg' \\(label map\\).*fix label_key"):
            batch_label_map({"z_mu": torch.zeros(1)}, "seg", torch.device("cpu"), what)
