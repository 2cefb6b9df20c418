"""Generation from 3D box layouts (``configs/inference_layout.json``): through the layout-attention blocks
(:mod:`scripts.layout_attention`) from the boxes alone, or, with a base label map (``--paste_onto``), through the
label-map ControlNet (:func:`scripts.synthesis.synthesize_layouts`). Each output comes with its box check."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.layout_attention import LayoutAttention, check_layout_record, encode_layout, layout_denoiser
from scripts.nifti import save_nifti
from scripts.provenance import hashed_facts, write_provenance
from scripts.storage import atomic_write_json, new_run_dir
from scripts.synthesis import (
    box_check,
    box_check_summary,
    print_box_check,
    sample_one,
    synthesize_layouts,
    write_instances,
)

__all__ = ["generate_layouts", "layout_generation", "layout_grid"]


def layout_grid(layout: Any, volume_size: Sequence[int], spacing: Sequence[float],
                orientation: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """The output grid of a layout generated on the training grid: the reference's when it has the training
    shape, spacing and orientation, else (no reference) the training grid centred at the origin.

    Raises:
        ValueError: a reference on another grid (layout blocks generate on the training grid), naming the file.
    """
    import nibabel as nib

    from scripts import layout as lay

    shape, affine = lay.output_grid(layout, volume_size, spacing, orientation)
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    axes = "".join(nib.aff2axcodes(affine))
    if (tuple(shape) != tuple(int(s) for s in volume_size) or not np.allclose(voxel, spacing, atol=1e-3)
            or axes != orientation):
        raise ValueError(f"layout {layout.source}: its reference {layout.reference} ({list(shape)} voxels of "
                         f"{voxel.round(3).tolist()} mm, {axes}) is not on the training grid ({list(volume_size)} of "
                         f"{list(spacing)} mm, {orientation}); the layout blocks generate on the training grid: drop "
                         "the reference or resample it.")
    return tuple(int(s) for s in shape), affine


def generate_layouts(
    layouts: Sequence[str],
    pipeline: Any,
    blocks: LayoutAttention,
    latent_shape: Sequence[int],
    output_dir: str,
    volume_size: Sequence[int],
    spacing: Sequence[float],
    orientation: str = "RAS",
    samples_per_layout: int = 1,
    seed: int = 0,
    layout_guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Generate ``samples_per_layout`` volumes for each layout through the layout blocks into a new folder
    ``output_dir/layout_<time>``.

    For layout ``j`` and draw ``k`` (sample ``i = j * samples_per_layout + k``, a function of ``(seed, i)`` only):
    ``sample_<i>_image.nii.gz`` and ``sample_<i>_label.nii.gz`` (the layout's instance label map, one id per box) on
    the same grid and affine, ``layout_<j>_instances.nii.gz`` / ``.json`` (id -> class), ``samples.png`` (each image
    with its boxes' outlines) and ``manifest.json`` with every sample's box check and their summary.

    Args:
        layouts: layout JSON files (:mod:`scripts.layout`); classes outside ``blocks.classes`` are refused.
        pipeline: the sampling pipeline (UNet, sampler, autoencoder), without a ControlNet.
        blocks: the trained layout blocks.
        latent_shape: ``(C, *latent_spatial)`` of the training grid.
        output_dir: parent of the run folder.
        volume_size, spacing, orientation: the training grid.
        samples_per_layout: volumes per layout.
        seed: base seed.
        layout_guidance_scale: classifier-free guidance against the empty layout (1: none; 0: unconditional).
        device: where to sample.
        segmenter: ``image -> lesion components`` for the box check; ``None``: the demo's known-truth segmentation.
        record: extra facts for the manifest (files named by keys ending in ``_path`` are hashed).
        progress: show progress bars.
    """
    from scripts import layout as lay
    from scripts.visualize import label_overlay_grid

    if not layouts:
        raise ValueError("give --layouts with at least one layout JSON file (see scripts/schemas/layout.schema.json).")
    read = [lay.read_layout(path, blocks.classes) for path in layouts]
    grids = [layout_grid(layout, volume_size, spacing, orientation) for layout in read]
    run_dir = new_run_dir(output_dir, "layout")
    for net in (pipeline.network, pipeline.autoencoder, blocks):
        net.eval().to(device)
    start, entries, panels = time.time(), [], []
    for j, (layout, (shape, affine)) in enumerate(zip(read, grids, strict=True)):
        instances, names = lay.rasterise(layout, shape, affine)
        write_instances(instances, names, affine, run_dir / f"layout_{j:04d}", str(layouts[j]))
        encoded = tuple(t.to(device) for t in encode_layout(instances, names, blocks.classes, str(layouts[j])))
        denoise = layout_denoiser(pipeline, blocks, encoded, float(layout_guidance_scale))
        for k in range(int(samples_per_layout)):
            i = j * int(samples_per_layout) + k
            image = sample_one(pipeline, denoise, latent_shape, seed, i, device, progress)
            image_file = save_nifti(image, affine, run_dir / f"sample_{i:04d}_image.nii.gz")
            label_file = save_nifti(instances, affine, run_dir / f"sample_{i:04d}_label.nii.gz", dtype=np.int16)
            check = box_check(image.numpy()[0], instances, names, spacing, segmenter)
            entries.append({"index": i, "seed": int(seed), "layout": str(layouts[j]), "image": image_file.name,
                            "label": label_file.name, "shape": list(shape), "instances": names, "box_check": check})
            panels.append((f"sample {i}", image.numpy(), instances))
    seconds = time.time() - start
    outline_names = {box_id: f"box {box_id}" for box_id in range(1, max(max(e["instances"]) for e in entries) + 1)}
    label_overlay_grid(panels, run_dir / "samples.png", outline_names,
                       title=f"{len(entries)} volumes from {len(layouts)} layout(s), seed {seed}, layout guidance "
                             f"{float(layout_guidance_scale):g}")
    summary = box_check_summary([e["box_check"] for e in entries])
    for e in entries:
        e["instances"] = {str(k): v for k, v in e["instances"].items()}
    manifest = {
        **pipeline.describe(), "layout_control": "layout attention", "layout_guidance_scale":
        float(layout_guidance_scale), "network_calls_per_step": 1 if float(layout_guidance_scale) == 1.0 else 2,
        "unconditional_branch": "the empty layout", "layout_classes": list(blocks.classes),
        "layout_levels": list(blocks.levels), "samples_per_layout": int(samples_per_layout), "seed": int(seed),
        "layouts": [str(p) for p in layouts], "box_check_segmenter": "known_truth" if segmenter is None else "given",
        "box_check_summary": summary, "samples": entries, "seconds_total": round(seconds, 2), "device": str(device),
        "torch": torch.__version__, **hashed_facts(record),
    }
    atomic_write_json(manifest, run_dir / "manifest.json")
    write_provenance(run_dir, seed=seed)
    print(f"generated {len(entries)} volume(s) from {len(layouts)} layout(s) in {seconds:.1f} s: {run_dir}")
    print_box_check(summary)
    return run_dir


def layout_generation(layouts: Sequence[str], paste_onto: str | None, synthesis: Any,
                      generate: Callable[..., Path], blocks: LayoutAttention, layout_record: Mapping[str, Any],
                      diffusion_path: str, layout_path: str) -> Path:
    """The workflow of ``configs/inference_layout.json``: with ``paste_onto``, the ControlNet path
    (:func:`scripts.synthesis.synthesize_layouts` with ``synthesis``, the ``synthesize`` of
    ``configs/inference_controlnet.json``); without, the layout blocks (``generate``, :func:`generate_layouts` with
    its settings bound), after checking their record against the diffusion weights and loading ``layout_path``.

    Raises:
        ValueError: ``paste_onto`` without the ControlNet config merged, naming the fix.
    """
    if paste_onto:
        if not callable(synthesis):
            raise ValueError("--paste_onto generates through the label-map ControlNet: merge "
                             "configs/inference_controlnet.json before configs/inference_layout.json in --config_file.")
        return synthesize_layouts(layouts, paste_onto, synthesis)
    from scripts.weights import load_weights

    classes = check_layout_record(layout_record, diffusion_path, layout_path)
    if list(classes) != list(blocks.classes):
        raise ValueError(f"layout_classes {blocks.classes} differ from those of {layout_path} ({classes}); drop the "
                         "layout_classes override.")
    load_weights(blocks, layout_path, what="layout blocks")
    return generate(layouts=layouts, blocks=blocks)
