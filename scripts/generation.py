"""Generation: sample latents with any MONAI scheduler, decode them (tiled if asked), write NIfTI + PNG + manifest."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from scripts.diffusion import decode_latents, sample_generators, sample_latents
from scripts.engines.base import amp_dtype_of, autocast_context
from scripts.nifti import centered_affine, save_nifti
from scripts.storage import atomic_write_json, file_sha256, new_run_dir
from scripts.visualize import sample_grid

__all__ = ["generate", "initial_noise", "sample_items"]


def initial_noise(latent_shape: Sequence[int], indices: Sequence[int], seed: int,
                  device: str | torch.device) -> torch.Tensor:
    """Starting noise ``(len(indices), *latent_shape)``; sample ``i``'s noise depends only on ``(seed, i)``."""
    generators = sample_generators(seed, indices)  # on CPU: the same noise on any device
    return torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators]).to(device)


def sample_items(num_samples: int, seed: int = 0) -> list[dict[str, int]]:
    """The samples of a generation run, ``{"index": i, "seed": seed}`` for ``i < num_samples`` (the workflow's
    ``dataset``); sample ``i`` is a function of its ``(seed, index)`` only."""
    return [{"index": i, "seed": int(seed)} for i in range(int(num_samples))]


def generate(
    network: nn.Module,
    autoencoder: nn.Module,
    scheduler: nn.Module,
    scale_factor: float,
    latent_shape: Sequence[int],
    output_dir: str,
    spacing: Sequence[float],
    orientation: str = "RAS",
    num_samples: int = 4,
    batch_size: int = 1,
    seed: int = 0,
    num_inference_steps: int = 50,
    device: str | torch.device = "cpu",
    decode_inferer: Inferer | None = None,
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
    samples: Sequence[Mapping[str, int]] | None = None,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
) -> Path:
    """Generate ``num_samples`` volumes into a new folder ``output_dir/generated_<time>``.

    Writes ``sample_0000.nii.gz``... (affine with the training's ``spacing`` and ``orientation``, centred at the
    origin), ``samples.png`` (orthogonal mid-slices of every sample) and ``manifest.json`` (sampler and its prediction
    type, steps, seed, scale factor, the hashes of the checkpoints and of the training record, time).

    Args:
        network: diffusion UNet (usually the EMA weights), latent space.
        autoencoder: stage-1 autoencoder; its decoder maps ``latent / scale_factor`` to image space.
        scheduler: the sampler (MONAI DDPM/DDIM/PNDM/RFlow scheduler).
        scale_factor: the training scale factor (from the training record).
        latent_shape: ``(latent_channels, *latent_spatial)``.
        output_dir: parent of the run folder.
        spacing: voxel size of the written volumes, in mm (the training's).
        orientation: axis codes of the volumes' voxel axes (the training's, e.g. ``RAS``).
        num_samples: how many volumes.
        batch_size: volumes sampled together (does not change any sample).
        seed: sample ``i`` is a function of ``(seed, i)`` only.
        num_inference_steps: reverse-process steps.
        device: device to sample on.
        decode_inferer: e.g. a ``SlidingWindowInferer`` over the latent for tiled decoding in bounded memory.
        record: extra facts for the manifest (files named by keys ending in ``_path`` are hashed).
        progress: show progress bars.
        samples: the samples to draw, ``{"index", "seed"}`` items (:func:`sample_items`); default
            ``sample_items(num_samples, seed)``.
        amp: autocast the UNet and the decoder (``amp_dtype``); the written volumes are float32.
        amp_dtype: ``"bfloat16"`` or ``"float16"``.
    """
    run_dir = new_run_dir(output_dir, "generated")
    network = network.eval().to(device)
    autoencoder = autoencoder.eval().to(device)
    start = time.time()
    files, volumes = [], []
    items = list(samples) if samples is not None else sample_items(num_samples, seed)
    num_samples = len(items)
    seeds = sorted({int(s["seed"]) for s in items})
    seed = seeds[0] if len(seeds) == 1 else seed
    batches = [items[i:i + batch_size] for i in range(0, num_samples, batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_samples, desc=f"generating ({type(scheduler).__name__}, {num_inference_steps} steps)")
    for batch in batches:
        indices = [int(s["index"]) for s in batch]
        noise = torch.cat([initial_noise(latent_shape, [int(s["index"])], int(s["seed"]), device) for s in batch])
        generators = [g for s in batch
                      for g in sample_generators(int(s["seed"]) + 1, [int(s["index"])], device=noise.device)]
        with autocast_context(noise.device, amp, amp_dtype_of(amp_dtype)):
            latents = sample_latents(network, scheduler, noise, num_inference_steps, generators, progress=progress)
            images = decode_latents(autoencoder, latents, scale_factor, decode_inferer)
        images = images.float().cpu()
        for i, image in zip(indices, images, strict=True):
            affine = centered_affine(image.shape[1:], spacing, orientation)
            files.append(save_nifti(image, affine, run_dir / f"sample_{i:04d}.nii.gz"))
            volumes.append((f"sample {i}", image.numpy()))
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    sample_grid(volumes, run_dir / "samples.png", title=f"{num_samples} samples, {type(scheduler).__name__}, "
            f"{num_inference_steps} steps, seed {seed}", vmin=0.0, vmax=1.0)
    facts = dict(record or {})
    for key, value in list(facts.items()):
        if key.endswith("_path") and value and Path(str(value)).is_file():
            facts[key.replace("_path", "_sha256")] = file_sha256(value)
    manifest = {
        "sampler": type(scheduler).__name__, "prediction_type": str(getattr(scheduler, "prediction_type", "")),
        "num_inference_steps": int(num_inference_steps), "seed": int(seed) if len(seeds) == 1 else seeds,
        "num_samples": int(num_samples), "batch_size": int(batch_size), "scale_factor": float(scale_factor),
        "latent_shape": list(latent_shape), "image_shape": list(images.shape[1:]),
        "spacing_mm": list(map(float, spacing)), "orientation": str(orientation),
        "files": [f.name for f in files], "seconds_total": round(seconds, 2),
        "seconds_per_sample": round(seconds / max(num_samples, 1), 2), "device": str(device),
        "torch": torch.__version__, "python": platform.python_version(), **facts,
    }
    atomic_write_json(manifest, run_dir / "manifest.json")
    print(f"generated {num_samples} volume(s) in {seconds:.1f} s ({manifest['sampler']}, {num_inference_steps} steps): "
          f"{run_dir}\n  NIfTI: {', '.join(f.name for f in files)}\n  montage: {run_dir / 'samples.png'}\n"
          f"  manifest: {run_dir / 'manifest.json'}")
    return run_dir

