"""Generation: sample latents with any MONAI scheduler, decode them (tiled if asked), write NIfTI + PNG + manifest."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from scripts.evaluation.control import ControlCheck, control_summary
from scripts.nifti import centered_affine, save_nifti
from scripts.provenance import hashed_facts, write_provenance
from scripts.sampling import LatentDiffusionPipeline, initial_noise, sample_generators
from scripts.storage import atomic_write_json, new_run_dir
from scripts.visualize import sample_grid

__all__ = ["draw_samples", "generate", "sample_items", "sample_like"]


def sample_items(num_samples: int, seed: int = 0) -> list[dict[str, int]]:
    """The samples of a generation run, ``{"index": i, "seed": seed}`` for ``i < num_samples`` (the workflow's
    ``dataset``); sample ``i`` is a function of its ``(seed, index)`` only."""
    return [{"index": i, "seed": int(seed)} for i in range(int(num_samples))]


def draw_samples(pipeline: LatentDiffusionPipeline, latent_shape: Sequence[int], items: Sequence[Mapping[str, Any]],
                 device: str | torch.device = "cpu", progress: bool = True,
                 condition: torch.Tensor | None = None) -> torch.Tensor:
    """Sample and decode one batch of :func:`sample_items` entries: images ``(len(items), C, *spatial)`` in image
    space, on the CPU. Sample ``{"index": i, "seed": s}`` is a function of ``(s, i)`` only, whatever the batch;
    ``condition`` holds the batch's raw condition rows ``(len(items), width)`` when the pipeline has conditions."""
    noise = torch.cat([initial_noise(latent_shape, [int(s["index"])], int(s["seed"]), device) for s in items])
    generators = [g for s in items
                  for g in sample_generators(int(s["seed"]) + 1, [int(s["index"])], device=noise.device)]
    return pipeline(noise, generators, condition=condition, progress=progress).cpu()


def sample_like(pipeline: LatentDiffusionPipeline, latent_shape: Sequence[int], reference: MetaTensor, seed: int = 0,
                index: int = 0, device: str | torch.device = "cpu") -> MetaTensor:
    """Sample ``index`` of ``seed`` (the volume ``generate`` writes as ``sample_<index>.nii.gz`` with that seed) on
    the grid of a preprocessed reference image, so that inverting the preprocessing (the configs'
    ``postprocessing``) puts it on the reference's own grid, e.g. for MONAI Label.

    Args:
        pipeline: the sampling pipeline.
        latent_shape: ``(latent_channels, *latent_spatial)``.
        reference: the reference image after the configs' ``preprocessing``, ``(C, *spatial)`` (image space); only
            its grid and its record of applied transforms are used.
        seed, index: which sample.
        device: device to sample on.

    Returns:
        the sample ``(C, *spatial)`` with ``reference``'s metadata and applied transforms.

    Raises:
        ValueError: the sample's grid differs from the preprocessed reference's (the training's ``image_size``
            against ``volume_size``); the message names both keys.
    """
    pipeline.network.eval().to(device)
    pipeline.autoencoder.eval().to(device)
    image = draw_samples(pipeline, latent_shape, [{"index": int(index), "seed": int(seed)}], device, progress=False)[0]
    if tuple(image.shape[1:]) != tuple(reference.shape[1:]):
        raise ValueError(f"generated volumes are {list(image.shape[1:])} voxels but the preprocessing makes the "
                         f"reference {list(reference.shape[1:])}: set --volume_size to the generation's image_size.")
    return MetaTensor(image, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))


def generate(
    pipeline: LatentDiffusionPipeline,
    latent_shape: Sequence[int],
    output_dir: str,
    spacing: Sequence[float],
    orientation: str = "RAS",
    num_samples: int = 4,
    batch_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
    samples: Sequence[Mapping[str, Any]] | None = None,
    control: ControlCheck | None = None,
) -> Path:
    """Generate ``num_samples`` volumes into a new folder ``output_dir/generated_<time>``.

    Writes ``sample_0000.nii.gz``... (affine with the training's ``spacing`` and ``orientation``, centred at the
    origin), ``samples.png`` (orthogonal mid-slices of every sample) and ``manifest.json`` (sampler and its prediction
    type, steps, network calls per step, seed, scale factor, the hashes of the checkpoints and of the training
    record, time).

    Args:
        pipeline: the sampling pipeline (UNet, sampler, decoder, steps, guidance, autocast).
        latent_shape: ``(latent_channels, *latent_spatial)``.
        output_dir: parent of the run folder.
        spacing: voxel size of the written volumes, in mm (the training's).
        orientation: axis codes of the volumes' voxel axes (the training's, e.g. ``RAS``).
        num_samples: how many volumes.
        batch_size: volumes sampled together (does not change any sample).
        seed: sample ``i`` is a function of ``(seed, i)`` only.
        device: device to sample on.
        record: extra facts for the manifest (files named by keys ending in ``_path`` are hashed).
        progress: show progress bars.
        samples: the samples to draw, ``{"index", "seed"}`` items (:func:`sample_items`), with ``"condition"``
            (name -> requested value, :func:`scripts.conditioning.condition_samples`) when the pipeline has
            conditions; default ``sample_items(num_samples, seed)``.
        control: measures each sample for the control check (:class:`scripts.evaluation.control.ControlCheck`):
            the manifest's ``samples`` entries then hold the requested and measured values, and ``control`` the
            error per condition (:func:`scripts.evaluation.control.control_summary`).
    """
    run_dir = new_run_dir(output_dir, "generated")
    pipeline.network.eval().to(device)
    pipeline.autoencoder.eval().to(device)
    start = time.time()
    files, volumes, entries = [], [], []
    conditions = pipeline.conditions
    items = list(samples) if samples is not None else sample_items(num_samples, seed)
    num_samples = len(items)
    seeds = sorted({int(s["seed"]) for s in items})
    seed = seeds[0] if len(seeds) == 1 else seed
    batches = [items[i:i + batch_size] for i in range(0, num_samples, batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_samples,
                   desc=f"generating ({type(pipeline.scheduler).__name__}, {pipeline.num_inference_steps} steps)")
    for batch in batches:
        indices = [int(s["index"]) for s in batch]
        requests = [dict(s.get("condition") or {}) for s in batch]
        condition = None if conditions is None else conditions.rows(requests).to(device)
        images = draw_samples(pipeline, latent_shape, batch, device, progress, condition)
        for j, (i, image) in enumerate(zip(indices, images, strict=True)):
            affine = centered_affine(image.shape[1:], spacing, orientation)
            files.append(save_nifti(image, affine, run_dir / f"sample_{i:04d}.nii.gz"))
            volumes.append((f"sample {i}", image.numpy()))
            entry: dict[str, Any] = {"file": files[-1].name, "index": i, "seed": int(batch[j]["seed"])}
            if conditions is not None:
                entry.update(condition=conditions.describe_row(condition[j].cpu()),  # as the model was given it
                             network_calls_per_step=pipeline.network_calls_per_step(condition[j : j + 1]))
                if control is not None:
                    entry["measured"] = control(image.numpy(), spacing)
            entries.append(entry)
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    sampling = pipeline.describe()
    if conditions is not None:
        sampling["network_calls_per_step"] = max(e["network_calls_per_step"] for e in entries)
        sampling["conditions"] = conditions.names
    sample_grid(volumes, run_dir / "samples.png", title=f"{num_samples} samples, {sampling['sampler']}, "
            f"{sampling['num_inference_steps']} steps, seed {seed}", vmin=0.0, vmax=1.0)
    facts = hashed_facts(record)
    manifest = {
        **sampling, "seed": int(seed) if len(seeds) == 1 else seeds,
        "num_samples": int(num_samples), "batch_size": int(batch_size),
        "latent_shape": list(latent_shape), "image_shape": list(images.shape[1:]),
        "spacing_mm": list(map(float, spacing)), "orientation": str(orientation),
        "files": [f.name for f in files], "seconds_total": round(seconds, 2),
        "seconds_per_sample": round(seconds / max(num_samples, 1), 2), "device": str(device),
        "torch": torch.__version__, "python": platform.python_version(), **facts, "samples": entries,
    }
    if control is not None and conditions is not None:
        ranges = {sp["name"]: (sp["min"], sp["max"]) for sp in conditions.specs if "min" in sp}
        manifest["control"] = control_summary(entries, ranges)
    atomic_write_json(manifest, run_dir / "manifest.json")
    write_provenance(run_dir, seed=seed)
    print(f"generated {num_samples} volume(s) in {seconds:.1f} s ({manifest['sampler']}, "
          f"{manifest['num_inference_steps']} steps): "
          f"{run_dir}\n  NIfTI: {', '.join(f.name for f in files)}\n  montage: {run_dir / 'samples.png'}\n"
          f"  manifest: {run_dir / 'manifest.json'}")
    for name, summary in manifest.get("control", {}).items():
        print(f"  control {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    return run_dir

