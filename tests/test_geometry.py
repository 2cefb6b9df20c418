"""Geometry of real data: LPS-oriented, oblique and anisotropic inputs with a non-zero origin keep the world
position of their landmarks through reconstruction; generated volumes carry the training record's geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch

from tests.helpers import COMMON, TINY, config_network, overrides_for, run_bundle

SHAPE = (32, 26, 16)
LANDMARKS = [(7, 6, 4), (24, 19, 11), (7, 19, 11)]  # source voxels, each the centre of a bright blob, 25 mm apart
BLOB_MM = 3.0  # the blobs' standard deviation in world space: smooth at the 3 mm output grid, so centroids are exact


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def _affine(rotation: np.ndarray, spacing, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


CASES = {  # name -> voxel-to-world affine (mm)
    "lps_anisotropic": _affine(np.diag([-1.0, -1.0, 1.0]), (2.0, 2.5, 5.0), (100.0, -50.0, 30.0)),
    "oblique_anisotropic": _affine(_rotation(20, 10), (2.5, 2.0, 4.0), (-40.0, 25.0, 60.0)),
    "oblique_lps": _affine(np.diag([-1.0, -1.0, 1.0]) @ _rotation(-15, 5), (1.5, 2.5, 5.0), (12.0, 140.0, -80.0)),
}


def _world(affine: np.ndarray, voxel) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(voxel, dtype=float) + affine[:3, 3]


def _landmark_world(img: nib.Nifti1Image, expected_world: np.ndarray) -> np.ndarray:
    """World position of the intensity centroid of the landmark near ``expected_world`` in ``img``."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    guess = np.rint(np.linalg.inv(img.affine) @ np.append(expected_world, 1.0))[:3].astype(int)
    lo, hi = np.maximum(guess - 3, 0), np.minimum(guess + 4, data.shape)
    window = data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    window = np.where(window > 0.1, window, 0.0)
    assert window.sum() > 0, f"no landmark near voxel {guess.tolist()}"
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
    centroid = (grid * window[..., None]).sum((0, 1, 2)) / window.sum()
    return _world(img.affine, centroid)


def test_reconstruction_keeps_world_coordinates_of_landmarks(tmp_path):
    files = []
    for name, affine in CASES.items():
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
        world = grid @ affine[:3, :3].T + affine[:3, 3]
        volume = sum(np.exp(-((world - _world(affine, landmark)) ** 2).sum(-1) / (2 * BLOB_MM**2))
                     for landmark in LANDMARKS).reshape(SHAPE).astype(np.float32)
        img = nib.Nifti1Image(volume, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, tmp_path / f"{name}.nii.gz")
        files.append(str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "models").mkdir()
    autoencoder = config_network("autoencoder_def", TINY, seed=0)  # untrained: the geometry is what is checked
    torch.save(autoencoder.state_dict(), tmp_path / "models" / "model_autoencoder.pt")
    # the whole intensity range, so that the landmarks stay the brightest voxels
    run_bundle([COMMON, "configs/inference_autoencoder.json"],
               overrides_for(tmp_path, infer=True, files=files, intensity_upper_percentile=100.0, amp=False))
    out = next((tmp_path / "outputs").glob("reconstruction_*"))
    spacing = 3.0  # the configured spacing the volumes are resampled to
    for name, affine in CASES.items():
        written = nib.load(out / f"{name}_input.nii.gz")
        reconstruction = nib.load(out / f"{name}_reconstruction.nii.gz")
        np.testing.assert_allclose(reconstruction.affine, written.affine, atol=1e-5)
        np.testing.assert_allclose(written.header.get_zooms(), [spacing] * 3, atol=1e-4)
        assert nib.aff2axcodes(written.affine) == ("R", "A", "S"), name
        for landmark in LANDMARKS:
            source = _world(affine, landmark)
            error = np.abs(_landmark_world(written, source) - source).max()  # within the landmark's voxel
            assert error <= spacing / 2, f"{name}: landmark {landmark} moved {error:.2f} mm"


def test_generated_volumes_carry_the_recorded_spacing_and_orientation(tmp_path):
    """``generate`` writes the training record's spacing and orientation (anisotropic, LPS), centred at world
    (0, 0, 0): a generated volume has no patient position."""
    from monai.networks.schedulers import DDIMScheduler

    from scripts.generation import generate
    from scripts.sampling import LatentDiffusionPipeline

    class Pipeline(LatentDiffusionPipeline):  # the real pipeline, decoding every latent to a ramp of 2x its size
        def __init__(self):
            super().__init__(torch.nn.Identity(), DDIMScheduler(num_train_timesteps=10), torch.nn.Identity(), 1.0, 1)

        def __call__(self, noise, generators, condition=None, unconditional=None, control=None, progress=False):
            size = [2 * s for s in noise.shape[2:]]
            return torch.linspace(0, 1, int(np.prod(size))).reshape(1, 1, *size).repeat(noise.shape[0], 1, 1, 1, 1)

    run = generate(Pipeline(), [4, 4, 5, 6], str(tmp_path), spacing=[1.5, 2.0, 4.0], orientation="LPS",
                   num_samples=1, progress=False)
    img = nib.load(run / "sample_0000.nii.gz")
    assert img.shape == (8, 10, 12) and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.header.get_zooms(), [1.5, 2.0, 4.0])
    np.testing.assert_allclose(_world(img.affine, (np.array(img.shape) - 1) / 2), 0.0, atol=1e-6)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["spacing_mm"] == [1.5, 2.0, 4.0] and manifest["orientation"] == "LPS"
