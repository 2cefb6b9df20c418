"""Synthesis from label maps: for each given map, generate images that follow it (ControlNet on the stage-2 UNet) and
write each as a NIfTI pair, image and label, on the map's own grid, with the control check of every output."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.controlnet import control_check, control_image, label_vocabulary, latent_control, null_control
from scripts.nifti import save_nifti
from scripts.provenance import hashed_facts, write_provenance
from scripts.sampling import LatentDiffusionPipeline, classifier_free, initial_noise, reverse_process, sample_generators
from scripts.storage import atomic_write_json, new_run_dir

__all__ = ["box_check", "box_check_summary", "controlled_denoiser", "label_items", "load_label_map", "print_box_check",
           "sample_one", "synthesize", "synthesize_layouts", "synthesize_one", "to_input_grid", "write_instances"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def label_items(label_maps: str | Sequence[str] | None, split: str, dataset_dir: str, datalist: str | None = None,
                demo_dir: str | None = None, demo: Mapping | None = None, label_key: str = "label") -> list[dict]:
    """The label maps to synthesise from: ``label_maps`` (files, or one folder of NIfTI files), else the ``label``
    of every item of a datalist split.

    Raises:
        FileNotFoundError: a named file or folder does not exist, or a folder holds no NIfTI file.
    """
    from scripts.data import load_datalist, resolve_datalist

    if label_maps:
        paths = [label_maps] if isinstance(label_maps, str) else list(label_maps)
        if len(paths) == 1 and os.path.isdir(paths[0]):
            folder = paths[0]
            paths = sorted(str(p) for p in Path(folder).iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not paths:
                raise FileNotFoundError(f"label_maps folder '{folder}' holds no .nii or .nii.gz file.")
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"label map '{path}' not found; fix label_maps.")
        return [{label_key: os.path.abspath(p)} for p in paths]
    items = load_datalist(resolve_datalist(dataset_dir, datalist, demo_dir, demo), split, base_dir=dataset_dir)
    missing = [it.get("image") for it in items if not it.get(label_key)]
    if missing or not items:
        raise FileNotFoundError(f"the datalist split '{split}' has {'no items' if not items else 'items without a '}"
                                f"{'' if not items else repr(label_key)} ({missing[:2] if missing else ''}); pass "
                                "--label_maps with label files or a folder.")
    return [{label_key: it[label_key]} for it in items]


def load_label_map(path: str, transform: Callable, spacing: Sequence[float],
                   label_key: str = "label") -> tuple[Any, Any]:
    """``(map as given, map on the training grid)``: the file read as it is (``(1, *spatial)`` MetaTensor with its
    affine) and through the label preprocessing (orientation, spacing, size of training; vocabulary checked).

    Raises:
        ValueError: the map's grid cannot be resampled to the training ``spacing`` (a singular affine, or a field of
            view thinner than one training voxel along an axis, e.g. a single slice), naming the file.
    """
    from monai.transforms import LoadImage

    raw = LoadImage(image_only=True, ensure_channel_first=True)(path)
    affine = np.asarray(raw.affine, dtype=np.float64)
    if raw.ndim != 4 or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"label map {path} is not a 3D volume with an invertible affine (shape "
                         f"{tuple(raw.shape[1:])}): its grid cannot be resampled to the training spacing.")
    extent = np.asarray(raw.shape[1:], dtype=float) * np.linalg.norm(affine[:3, :3], axis=0)
    thin = [int(a) for a in np.flatnonzero(extent < np.min([float(s) for s in spacing]) * 1.5)]
    if thin:
        raise ValueError(f"label map {path} covers only {extent.round(2).tolist()} mm (voxel axes {thin} thinner "
                         f"than the training spacing {list(spacing)} mm): its grid cannot be resampled to it; give "
                         "a 3D map covering the anatomy.")
    prepared = transform({label_key: path})[label_key]
    return raw, prepared


def controlled_denoiser(pipeline: LatentDiffusionPipeline, control: torch.Tensor, unconditional: torch.Tensor,
                        guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, t) -> model output`` following ``control`` (image resolution): through the pipeline's ControlNet, or,
    without one, as a condition concatenated at latent resolution (a UNet trained in ``concat`` mode). With
    ``guidance_scale != 1``, classifier-free guidance on the control, ``out(unconditional) + w * (out(control) -
    out(unconditional))``, the two branches run as one batch (2 network calls a step)."""
    if pipeline.controlnet is None and pipeline.mode != "concat":
        raise ValueError("label-map synthesis needs a ControlNet (pipeline#controlnet) or a UNet trained with the "
                         "label map in concat mode (configs/inference_label_concat.json).")

    def output(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if pipeline.controlnet is not None:
            return pipeline.model_output(x, t, None, c)
        return pipeline.model_output(x, t, latent_control(c, x.shape[2:]), None)

    return classifier_free(output, control, unconditional, guidance_scale)


def to_input_grid(image: torch.Tensor, prepared: Any, raw: Any) -> tuple[torch.Tensor, bool]:
    """The image (on the training grid of ``prepared``) on the grid of the map as given; ``True`` if resampled."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    same = (tuple(raw.shape[1:]) == tuple(prepared.shape[1:])
            and np.allclose(np.asarray(raw.affine), np.asarray(prepared.affine), atol=1e-4))
    if same:
        return image, False
    moving = MetaTensor(image, affine=prepared.affine)
    out = ResampleToMatch(mode="bilinear", padding_mode="zeros")(moving, img_dst=raw)
    return torch.as_tensor(out).float(), True


def synthesize_one(pipeline: LatentDiffusionPipeline, prepared: torch.Tensor, classes: Mapping[int, str],
                   latent_shape: Sequence[int], seed: int = 0, index: int = 0, control_guidance_scale: float = 1.0,
                   removed: Sequence[int] | None = None, device: str | torch.device = "cpu",
                   progress: bool = False) -> torch.Tensor:
    """Sample ``index`` of ``seed`` following one label map on the training grid: ``(1, *spatial)`` float32, image
    space, on ``prepared``'s grid (what :func:`synthesize` writes as ``sample_<index>_image.nii.gz`` before
    resampling to the map's own grid).

    Args:
        pipeline: the sampling pipeline (ControlNet, or a UNet in concat mode).
        prepared: the label map through the label preprocessing, ``(1, *spatial)``.
        classes: the vocabulary ``{value: name}``.
        latent_shape: ``(C, *latent_spatial)``.
        seed, index: which sample.
        control_guidance_scale: guidance on the control (1: none).
        removed: the unconditional branch: the map without these label values; ``None``: no control.
        device: where to sample.
        progress: show the sampling bar.
    """
    label = torch.as_tensor(prepared)[None].to(device)
    control = control_image(label, list(classes))
    unconditional = null_control(control, list(classes), removed)
    denoise = controlled_denoiser(pipeline, control, unconditional, float(control_guidance_scale))
    return sample_one(pipeline, denoise, latent_shape, seed, index, device, progress)


def sample_one(pipeline: LatentDiffusionPipeline, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               latent_shape: Sequence[int], seed: int = 0, index: int = 0, device: str | torch.device = "cpu",
               progress: bool = False) -> torch.Tensor:
    """Sample ``index`` of ``seed`` with the model output ``denoise(x, t)``: noise and stochastic steps keyed by
    ``(seed, index)``, decoded; ``(C, *spatial)`` float32 on CPU, image space, on the training grid."""
    from scripts.engines.base import autocast_context

    noise = initial_noise(latent_shape, [index], seed, device)
    generators = sample_generators(seed + 1, [index], device=noise.device)
    with autocast_context(noise.device, pipeline.amp, pipeline.amp_dtype):
        latents = reverse_process(denoise, pipeline.scheduler, noise, pipeline.num_inference_steps, generators,
                                  progress=progress)
        return pipeline.decode(latents).float().cpu()[0]


def synthesize(
    pipeline: LatentDiffusionPipeline,
    label_items: Sequence[Mapping[str, str]],
    label_transform: Callable,
    label_classes: Mapping[Any, str],
    latent_shape: Sequence[int],
    output_dir: str,
    spacing: Sequence[float],
    samples_per_map: int = 1,
    seed: int = 0,
    control_guidance_scale: float = 1.0,
    null_classes: Sequence[str] | None = None,
    label_key: str = "label",
    device: str | torch.device = "cpu",
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> Path:
    """Generate ``samples_per_map`` images for each label map into a new folder ``output_dir/synthesis_<time>``.

    For map ``j`` and draw ``k`` (sample index ``i = j * samples_per_map + k``, a function of ``(seed, i)`` only):
    ``sample_<i>_image.nii.gz`` and ``sample_<i>_label.nii.gz`` on the map's own grid and affine (generated on the
    training grid, resampled back when the map's grid differs: stated per sample), ``samples.png`` (each image with
    its label's contours) and ``manifest.json`` with the control check of every sample (:func:`control_check`:
    Dice and volume error per class, on the training grid) and their means.

    Args:
        pipeline: the sampling pipeline, with its ``controlnet``.
        label_items: ``{label_key: path}`` per map (:func:`label_items`).
        label_transform: the label preprocessing (``label_preprocessing_transforms``, vocabulary check included).
        label_classes: the vocabulary the ControlNet was trained with.
        latent_shape: ``(C, *latent_spatial)`` of the training grid.
        output_dir: parent of the run folder.
        spacing: the training voxel size (mm), for the control check.
        samples_per_map: images per map.
        seed: base seed.
        control_guidance_scale: classifier-free guidance on the control (1: none, one network call a step).
        null_classes: the unconditional branch of that guidance: the map without these classes; ``None``: no
            control at all.
        label_key: the label field.
        device: where to sample.
        segmenter: ``image -> label map`` for the control check; ``None``: the demo's known-truth segmentation.
        record: extra facts for the manifest (files named by keys ending in ``_path`` are hashed).
        progress: show progress bars.
        run_dir: write into this existing folder instead of a new ``synthesis_<time>`` one.
    """
    from scripts.visualize import label_overlay_grid

    classes = label_vocabulary(label_classes)
    names = {name: index for index, name in classes.items()}
    unknown = sorted(set(null_classes or []) - set(names))
    if unknown:
        raise ValueError(f"null_classes names {unknown}, which are not in label_classes {list(names)}.")
    removed = None if null_classes is None else [names[n] for n in null_classes]
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(output_dir, "synthesis")
    for net in (pipeline.network, pipeline.controlnet, pipeline.autoencoder):
        if net is not None:
            net.eval().to(device)
    start = time.time()
    entries, panels = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(label_items) * samples_per_map, desc="synthesis from label maps")
    for j, item in enumerate(label_items):
        path = str(item[label_key])
        raw, prepared = load_label_map(path, label_transform, spacing, label_key)
        for k in range(int(samples_per_map)):
            i = j * int(samples_per_map) + k
            image = synthesize_one(pipeline, prepared, classes, latent_shape, seed, i, control_guidance_scale,
                                   removed, device, progress)
            check = control_check(image.numpy(), prepared.numpy(), classes, spacing, segmenter)
            out, resampled = to_input_grid(image, prepared, raw)
            affine = np.asarray(raw.affine, dtype=np.float64)
            image_file = save_nifti(out, affine, run_dir / f"sample_{i:04d}_image.nii.gz")
            label_file = save_nifti(np.asarray(raw).astype(np.int16), affine, run_dir / f"sample_{i:04d}_label.nii.gz",
                                    dtype=None)
            entries.append({"index": i, "seed": int(seed), "label_map": path, "image": image_file.name,
                            "label": label_file.name, "shape": list(out.shape[1:]), "resampled": resampled,
                            "control_check": check})
            panels.append((f"sample {i}", image.numpy(), prepared.numpy()))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    label_overlay_grid(panels, run_dir / "samples.png", classes,
                       title=f"{len(entries)} images from {len(label_items)} label map(s), seed {seed}")
    summary = {}
    for name in classes.values():
        dice = [e["control_check"][name]["dice"] for e in entries if name in e["control_check"]]
        err = [abs(e["control_check"][name]["volume_error"]) for e in entries if name in e["control_check"]]
        if dice:
            summary[name] = {"mean_dice": round(float(np.mean(dice)), 4),
                             "mean_abs_volume_error": round(float(np.mean(err)), 4)}
    facts = hashed_facts(record)
    manifest = {
        **pipeline.describe(), "network_calls_per_step": 1 if float(control_guidance_scale) == 1.0 else 2,
        "control_guidance_scale": float(control_guidance_scale), "conditioning_scale": pipeline.conditioning_scale,
        "label_control": "controlnet" if pipeline.controlnet is not None else "concat",
        "null_classes": None if null_classes is None else list(null_classes),
        "unconditional_branch": "no control" if null_classes is None else f"the map without {list(null_classes)}",
        "label_classes": {str(k): v for k, v in classes.items()}, "samples_per_map": int(samples_per_map),
        "seed": int(seed), "training_spacing_mm": [float(s) for s in spacing],
        "control_check_segmenter": "known_truth" if segmenter is None else "given",
        "control_check_summary": summary, "samples": entries, "seconds_total": round(seconds, 2),
        "device": str(device), "torch": torch.__version__, **facts,
    }
    atomic_write_json(manifest, run_dir / "manifest.json")
    write_provenance(run_dir, seed=seed)
    print(f"synthesised {len(entries)} image(s) from {len(label_items)} label map(s) in {seconds:.1f} s: {run_dir}\n"
          f"  control check (mean Dice): " + ", ".join(f"{n} {s['mean_dice']:.3f}" for n, s in summary.items())
          + f"\n  montage: {run_dir / 'samples.png'}\n  manifest: {run_dir / 'manifest.json'}")
    return run_dir


def box_check(image: np.ndarray, instances: np.ndarray, names: Mapping[int, str], spacing: Sequence[float],
              segmenter: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Whether a generated volume shows each box's class there (lesion boxes, measured with the demo's known-truth
    segmentation): per box, ``found`` (a lesion component's centroid inside the box) and ``iou`` (3D IoU between
    the box and that component's bounding box); ``lesions_outside`` counts components whose centroid is in no box.

    Args:
        image: ``(X, Y, Z)`` generated volume on the layout's grid.
        instances: the layout's instance map on that grid (box ``i`` has id ``i + 1``).
        names: ``{id: class}``.
        spacing: voxel size (mm) of the grid.
        segmenter: ``image -> lesion component labels`` (0 background); default the known-truth lesions.
    """
    from scipy import ndimage

    if segmenter is None:
        from scripts.evaluation.known_truth import segment

        components = segment(np.asarray(image, dtype=np.float32), spacing)["lesion_labels"]
    else:
        components = np.asarray(segmenter(image))
    count = int(components.max())
    centroids = ndimage.center_of_mass(np.ones_like(components), components, range(1, count + 1)) if count else []
    owner = [int(instances[tuple(int(round(c)) for c in centroid)]) for centroid in centroids]
    boxes = []
    for box_id, name in names.items():
        if name != "lesion":
            continue
        box = instances == box_id
        inside = [k + 1 for k, o in enumerate(owner) if o == box_id]
        entry = {"box": box_id - 1, "class": name, "found": bool(inside), "iou": 0.0}
        if inside:
            ious = []
            lo, hi = np.argwhere(box).min(0), np.argwhere(box).max(0) + 1
            for k in inside:
                pts = np.argwhere(components == k)
                clo, chi = pts.min(0), pts.max(0) + 1
                inter = np.prod(np.clip(np.minimum(hi, chi) - np.maximum(lo, clo), 0, None))
                union = np.prod(hi - lo) + np.prod(chi - clo) - inter
                ious.append(float(inter / union))
            entry["iou"] = round(max(ious), 4)
        boxes.append(entry)
    lesion_ids = {i for i, n in names.items() if n == "lesion"}
    return {"boxes": boxes, "lesions_found": count,
            "lesions_outside": int(sum(1 for o in owner if o not in lesion_ids))}


def box_check_summary(checks: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Box recall, mean IoU and the fraction of samples with a lesion outside every box, over :func:`box_check`
    results (one per sample)."""
    boxes = [b for check in checks for b in check["boxes"]]
    outside = sum(check["lesions_outside"] > 0 for check in checks)
    return {"box_recall": round(sum(b["found"] for b in boxes) / len(boxes), 4) if boxes else None,
            "mean_iou": round(float(np.mean([b["iou"] for b in boxes])), 4) if boxes else None,
            "samples_with_lesions_outside_boxes": round(outside / max(len(checks), 1), 4)}


def print_box_check(summary: Mapping[str, Any]) -> None:
    print(f"layouts: box recall {summary['box_recall']}, mean IoU {summary['mean_iou']}, samples with a lesion "
          f"outside every box {summary['samples_with_lesions_outside_boxes']}")


def synthesize_layouts(layouts: Sequence[str], paste_onto: str | None, synthesis: Callable[..., Path]) -> Path:
    """Generate from 3D box layouts (:mod:`scripts.layout`) through the label-map ControlNet: each layout's boxes are
    painted onto the base label map ``paste_onto`` in their class's label value, and the painted map is synthesised
    from (:func:`synthesize`). Writes, beside the image + label pairs, each layout's instance label map
    (``layout_<j>_instances.nii.gz``, one id per box, on the base map's grid and affine) with
    ``layout_<j>_instances.json`` (id -> class), and adds to each sample's manifest entry the box check
    (:func:`box_check`), with box recall, mean IoU and the fraction of samples with a lesion outside every box.

    Args:
        layouts: layout JSON files.
        paste_onto: the base label map (anatomy) the boxes are painted onto; its grid is the output grid.
        synthesis: :func:`synthesize` with its settings bound (``synthesize`` of ``configs/inference_controlnet.json``:
            ``label_transform``, ``label_classes``, ``output_dir``, ``spacing``, ``label_key`` are read from it).

    Raises:
        ValueError: no base map, a layout whose reference grid is not the base map's, or any refusal of
            :func:`scripts.layout.read_layout`.
    """
    import nibabel as nib

    from scripts import layout as lay

    if not paste_onto:
        raise ValueError("layout generation through the label-map ControlNet needs --paste_onto <label map> (the "
                         "anatomy the boxes are painted onto).")
    if not layouts:
        raise ValueError("give --layouts with at least one layout JSON file (see scripts/schemas/layout.schema.json).")
    settings = getattr(synthesis, "keywords", {})
    classes = label_vocabulary(settings["label_classes"])
    label_key = settings.get("label_key", "label")
    base = nib.load(paste_onto)
    base_map, affine = np.asarray(base.dataobj).astype(np.int16), np.asarray(base.affine, dtype=np.float64)
    run_dir = new_run_dir(settings["output_dir"], "layout")
    items, grids = [], []
    for j, path in enumerate(layouts):
        layout = lay.read_layout(path, list(classes.values()))
        if layout.reference:
            shape, ref_affine = lay.output_grid(layout, base_map.shape, settings["spacing"])
            if tuple(shape) != tuple(base_map.shape) or not np.allclose(ref_affine, affine, atol=1e-4):
                raise ValueError(f"layout {path}: its reference {layout.reference} is not on the grid of --paste_onto "
                                 f"{paste_onto}; drop the reference or give a base map on its grid.")
        instances, names = lay.rasterise(layout, base_map.shape, affine)
        painted = lay.paint(base_map, layout, affine, classes)
        label_file = save_nifti(painted, affine, run_dir / f"layout_{j:04d}_painted.nii.gz", dtype=np.int16)
        write_instances(instances, names, affine, run_dir / f"layout_{j:04d}", str(path))
        items.append({label_key: str(label_file)})
        grids.append((instances, names, str(path)))
    synthesis(label_items=items, run_dir=run_dir)
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    per_map = int(manifest["samples_per_map"])
    voxel = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    for sample in manifest["samples"]:
        instances, names, path = grids[sample["index"] // per_map]
        image = np.asarray(nib.load(run_dir / sample["image"]).dataobj, dtype=np.float32)
        sample.update(layout=path, box_check=box_check(image, instances, names, voxel))
    summary = box_check_summary([sample["box_check"] for sample in manifest["samples"]])
    manifest.update(paste_onto=str(paste_onto), layouts=[str(p) for p in layouts], box_check_summary=summary)
    atomic_write_json(manifest, manifest_path)
    print_box_check(summary)
    return run_dir


def write_instances(instances: np.ndarray, names: Mapping[int, str], affine: np.ndarray, stem: Path,
                    layout: str) -> Path:
    """A layout's instance label map ``<stem>_instances.nii.gz`` (one id per box) and its side file
    ``<stem>_instances.json`` (``{"layout", "instances": {id: class}}``)."""
    path = save_nifti(instances, affine, Path(f"{stem}_instances.nii.gz"), dtype=np.int16)
    atomic_write_json({"layout": layout, "instances": {str(k): v for k, v in names.items()}},
                      Path(f"{stem}_instances.json"))
    return path
