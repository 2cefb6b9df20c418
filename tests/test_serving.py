"""Served inference (scripts/serving.py, the MONAI Label app's bundle side): the configs resolve from any working
folder, every network a config builds takes its weight file strictly, the shared preprocessing tolerates extra
string keys, postprocessing puts answers back on the input's grid, and nothing is imported at forward time."""

from __future__ import annotations

import builtins
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.generation import sample_like
from scripts.serving import served_config
from scripts.weights import load_weights
from tests.helpers import COMMON, ROOT, TINY, TINY_DIFFUSION

#: tiny networks on 32^3 volumes (latents 4 x 8^3), float32
TINY_SERVED = {**{k: v for k, v in TINY.items() if k not in ("train_patch_size", "num_workers")}, **TINY_DIFFUSION,
               "amp": False}
#: and for generation (weights without a training record): two sampling steps
GENERATION = {"num_inference_steps": 2, "scale_factor": 1.0}


def _save_weights(root, seed: int = 0) -> None:
    """Untrained tiny weights in ``root/models``: the autoencoder and the (EMA) diffusion UNet."""
    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / COMMON)]))
    parser.update(TINY_SERVED)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), root / "models" / "model_autoencoder.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model_ema.pt")


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A bundle_root with tiny weights, and a working folder that is not the bundle."""
    _save_weights(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return {**TINY_SERVED, "bundle_root": str(tmp_path), "output_dir": str(tmp_path / "outputs")}


def _crop(path, shape=(56, 64, 48)) -> np.ndarray:
    """A volume of ``shape`` on an oblique-free, anisotropic, shifted grid, written to ``path``; its affine."""
    affine = np.diag([2.5, 3.0, 3.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    volume = (np.exp(-(x ** 2) * 3) * np.ones(shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return affine


def test_configs_resolve_from_any_working_folder(bundle, tmp_path):
    """bundle_root is the folder of the bundle's own configs, and generation's `recipe` reads common.json there."""
    import scripts

    parser = ConfigParser()
    parser.read_config([str(ROOT / COMMON), str(ROOT / "configs" / "inference.json")])
    assert parser.get_parsed_content("bundle_root") == scripts.BUNDLE_ROOT == str(ROOT)
    common = ConfigParser.load_config_file(str(ROOT / COMMON))
    assert parser.get_parsed_content("recipe") == {k: common[k] for k in parser.get_parsed_content("recipe")}


@pytest.mark.parametrize("overlay", [None, "configs/vqvae.json"])
def test_every_served_network_takes_its_weight_file_strictly(tmp_path, overlay):
    """The reconstruction network, the fixed-timestep denoiser and the export forms share the wrapped network's
    modules: their state dicts are the weight files' (no `autoencoder.`/`network.` prefix), and a prefixed file is
    refused with one line, never loaded with a warning."""
    overlays = [str(ROOT / overlay)] if overlay else []
    for workflow, net_ids in (("inference_autoencoder.json", {"network": "autoencoder_def"}),
                              ("inference.json", {"network_def": "network_def", "denoiser_def": "network_def",
                                                  "export_unet_def": "network_def",
                                                  "export_decoder_def": "autoencoder_def"})):
        parser = ConfigParser()
        parser.read_config([str(ROOT / COMMON), str(ROOT / "configs" / workflow), *overlays])
        parser.update({**TINY_SERVED, **GENERATION})
        for net_id, source_id in net_ids.items():
            network = parser.get_parsed_content(net_id)
            source = ConfigParser(parser.get()).get_parsed_content(source_id).state_dict()
            assert list(network.state_dict()) == list(source), net_id
            torch.save(source, tmp_path / "weights.pt")
            load_weights(network, str(tmp_path / "weights.pt"), what=net_id)
            torch.testing.assert_close(network.state_dict(), source)
            torch.save({f"autoencoder.{k}": v for k, v in source.items()}, tmp_path / "prefixed.pt")
            with pytest.raises(ValueError, match=r"does not match the network in the config .*missing key"):
                load_weights(network, str(tmp_path / "prefixed.pt"), what=net_id)


def _serve(parser: ConfigParser, data: dict, run) -> dict:
    """One served request through the workflow's own pieces: preprocessing, ``run`` on the image, postprocessing."""
    data = parser.get_parsed_content("preprocessing")(data)
    with torch.no_grad():
        data["pred"] = run(data["image"])
    return parser.get_parsed_content("postprocessing")(data)


def _reconstruct(parser: ConfigParser):
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("inferer")
    return lambda image: inferer(image[None], network)[0]


def test_reconstruction_of_a_crop_lands_on_the_input_grid(bundle, tmp_path):
    """A 56x64x48 crop with an extra string key (MONAI Label's `image_path`) comes back 56x64x48 with the input's
    affine; on the model's grid the answer is the network's own reconstruction."""
    path = tmp_path / "crop.nii.gz"
    affine = _crop(path)
    parser = served_config("reconstruction", bundle)
    out = _serve(parser, {"image": str(path), "image_path": str(path)}, _reconstruct(parser))
    assert out["image_path"] == str(path)
    assert tuple(out["pred"].shape) == (1, 56, 64, 48)
    np.testing.assert_allclose(np.asarray(out["pred"].affine), affine, atol=1e-5)

    # a volume already on the model's grid (RAS, 3 mm, 32^3) is answered with the reconstruction itself
    grid = tmp_path / "grid.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 32)).astype(np.float32),
                             np.diag([3.0, 3.0, 3.0, 1.0])), str(grid))
    prepared = parser.get_parsed_content("preprocessing")({"image": str(grid)})
    with torch.no_grad():
        expected = _reconstruct(parser)(prepared["image"])
    served = _serve(parser, {"image": str(grid), "image_path": str(grid)}, _reconstruct(parser))["pred"]
    torch.testing.assert_close(served.as_tensor(), expected.as_tensor(), atol=1e-5, rtol=0)


def test_generation_on_a_reference_grid_is_the_bundles_sample(bundle, tmp_path):
    """Served generation draws the volume `generate` writes as sample_0000 for the same seed and sampler, on the grid
    of the preprocessed reference, then back on the reference's own grid."""
    path = tmp_path / "reference.nii.gz"
    affine = _crop(path)
    parser = served_config("generation", {**bundle, **GENERATION, "noise_scheduler_type": "ddpm", "sampler": "ddim",
                                          "seed": 3, "num_samples": 1})
    pipeline, latent_shape = parser.get_parsed_content("pipeline"), parser.get_parsed_content("latent_shape")
    out = _serve(parser, {"image": str(path), "image_path": str(path)},
                 lambda ref: sample_like(pipeline, latent_shape, ref, seed=3))
    assert tuple(out["pred"].shape) == (1, 56, 64, 48)
    np.testing.assert_allclose(np.asarray(out["pred"].affine), affine, atol=1e-5)

    prepared = parser.get_parsed_content("preprocessing")({"image": str(path)})
    on_grid = sample_like(pipeline, latent_shape, prepared["image"], seed=3)
    parser.get_parsed_content("run")
    (written,) = (tmp_path / "outputs").glob("generated_*/sample_0000.nii.gz")
    torch.testing.assert_close(on_grid[0].double(), torch.as_tensor(nib.load(written).get_fdata()), atol=1e-5,
                               rtol=0)

    with pytest.raises(ValueError, match=r"set --volume_size to the generation's image_size"):
        sample_like(pipeline, latent_shape, prepared["image"][:, :16], seed=3)


def test_served_forward_passes_import_nothing(bundle, tmp_path, monkeypatch):
    """Once built, the served networks run with `scripts` unimportable (MONAI Label takes the bundle off sys.path
    after loading it)."""
    path = tmp_path / "crop.nii.gz"
    _crop(path)
    recon = served_config("reconstruction", bundle)
    generation = served_config("generation", {**bundle, **GENERATION})
    run_recon = _reconstruct(recon)
    pipeline, latent_shape = generation.get_parsed_content("pipeline"), generation.get_parsed_content("latent_shape")
    reference = recon.get_parsed_content("preprocessing")({"image": str(path)})["image"]

    real_import = builtins.__import__

    def no_bundle_import(name, *args, **kwargs):
        if name == "scripts" or name.startswith("scripts."):
            raise ImportError(f"forward pass imported {name}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_bundle_import)
    with torch.no_grad():
        assert run_recon(reference).shape == reference.shape
        assert sample_like(pipeline, latent_shape, reference, seed=0).shape == reference.shape


def test_a_served_override_that_no_config_defines_is_refused():
    """As `monai.bundle run` refuses it: MONAI Label's --conf overrides are checked against the task's configs."""
    with pytest.raises(KeyError, match=r"unknown config key 'generation override num_workers': no config file"):
        served_config("generation", {"num_workers": 0})
    with pytest.raises(KeyError, match=r"no served task 'segmentation'"):
        served_config("segmentation")


def test_a_sampler_the_model_cannot_use_is_refused_in_one_line(bundle):
    """A served request's sampler goes through the workflow's own check; the error is the bundle's line, not MONAI's
    'Failed to evaluate' wrapper."""
    with pytest.raises(ValueError, match=r"^sampler='ddim' cannot sample a model trained with noise_scheduler_type="
                                         r"'rflow'; use --sampler rflow\.$"):
        served_config("generation", {**bundle, **GENERATION, "sampler": "ddim"})
