"""Evaluation of generated volumes against a real split (``configs/evaluate.json``).

Rows of the result, each compared with the same reference (the second half of the real split):

- ``generated``: the generated volumes;
- ``real (floor)``: the first half of the real split, disjoint from the reference: what a perfect generator scores
  at this sample size;
- ``blurred real``: the first half smoothed with a Gaussian (``blur_sigma`` voxels), and ``noise``: volumes of
  uniform noise with the real intensity range: what a poor generator scores (ceilings).

Metrics: MS-SSIM diversity within each set, FID and MMD on features of :mod:`scripts.evaluation.features`
(reported under the extractor's name, e.g. "FID (random features)"), improved precision/recall in that feature
space, the intensity-histogram Wasserstein distance, the known-truth quantities of the demo phantom
(:mod:`scripts.evaluation.known_truth`) when the datalist records them, and for each generated volume its nearest
training volume by MS-SSIM (memorisation), next to the same figure between real subjects.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    GaussianSmooth,
    LoadImage,
    Orientation,
)

from scripts.evaluation import known_truth
from scripts.evaluation.features import FeatureExtractor
from scripts.evaluation.metrics import (
    MSSSIM,
    fid,
    histogram_distance,
    mmd,
    ms_ssim_diversity,
    nearest_neighbours,
    precision_recall,
    wasserstein_1d,
)
from scripts.storage import atomic_write_json, new_run_dir

__all__ = [
    "EvaluationError",
    "control_sets",
    "evaluate_sets",
    "generated_files",
    "load_generated",
    "load_real",
    "run_evaluation",
    "write_eval_metrics_to",
]

logger = logging.getLogger(__name__)
SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


class EvaluationError(ValueError):
    """Inputs the evaluation cannot compare (no volumes, mismatched shapes)."""


def generated_files(generated_dir: str | None, output_dir: str) -> list[Path]:
    """The generated volumes to evaluate: the image files of ``generated_dir``, or of the newest
    ``output_dir/generated_*`` folder when ``generated_dir`` is null."""
    if generated_dir:
        folder = Path(generated_dir)
        if not folder.is_dir():
            raise EvaluationError(f"generated_dir '{folder}' is not a folder; give the folder of generated NIfTI files "
                                  "(e.g. outputs/generated_<time>).")
    else:
        runs = sorted(Path(output_dir).glob("generated_*"))
        if not runs:
            raise EvaluationError(f"no generated_* folder under '{output_dir}': generate first "
                                  "(python -m monai.bundle run --config_file "
                                  "\"['configs/common.json','configs/inference.json']\") "
                                  "or pass --generated_dir.")
        folder = runs[-1]
    files = sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIXES))
    if len(files) < 2:
        raise EvaluationError(f"generated_dir '{folder}' holds {len(files)} volume(s); the set metrics need at least 2 "
                              "(generate more with --num_samples).")
    return files


def load_generated(files: Sequence[Path], orientation: str = "RAS") -> list[torch.Tensor]:
    """Generated volumes ``(1, X, Y, Z)`` as written by generation (already at the training spacing and size, in
    [0, 1]); only reoriented, never rescaled."""
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes=orientation)])
    return [torch.as_tensor(np.asarray(load(str(f))), dtype=torch.float32).clamp(0, 1) for f in files]


def load_real(items: Sequence[Mapping], transform: Callable) -> list[torch.Tensor]:
    """Real volumes ``(1, X, Y, Z)`` through the shared preprocessing chain (the one training used)."""
    if len(items) < 4:
        raise EvaluationError(f"the real split holds {len(items)} volume(s); the floor needs two disjoint halves of "
                              "at least 2: choose a larger --real_split (e.g. training).")
    return [torch.as_tensor(np.asarray(transform(dict(item))["image"]), dtype=torch.float32) for item in items]


def control_sets(volumes: Sequence[torch.Tensor], blur_sigma: float, seed: int) -> dict[str, list[torch.Tensor]]:
    """The ceiling sets made from real volumes: Gaussian-blurred copies, and uniform noise in their range."""
    blur = GaussianSmooth(sigma=blur_sigma)
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.rand(v.shape, generator=generator) * float(v.max()) for v in volumes]
    return {"blurred real": [torch.as_tensor(blur(v)).float() for v in volumes], "noise": noise}


def _check_shapes(sets: Mapping[str, Sequence[torch.Tensor]]) -> None:
    shapes = {name: {tuple(v.shape) for v in vols} for name, vols in sets.items()}
    found = set().union(*shapes.values())
    if len(found) > 1:
        detail = "; ".join(f"{n}: {sorted(s)}" for n, s in shapes.items())
        raise EvaluationError(f"volume shapes differ ({detail}). Generate at the training volume_size, or set "
                              "--volume_size to the generated size so the real volumes are cropped/padded to it.")


def evaluate_sets(
    generated: Sequence[torch.Tensor],
    real: Sequence[torch.Tensor],
    features: FeatureExtractor,
    ms_ssim: MSSSIM,
    training: Sequence[torch.Tensor] | None = None,
    spacing: Sequence[float] | None = None,
    real_params: Sequence[Mapping] | None = None,
    blur_sigma: float = 2.0,
    knn: int = 3,
    max_pairs: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of ``generated`` against ``real`` (split in two halves: floor set and reference), with the
    controls as ceilings. Returns the ``metrics.json`` content (rows -> metric -> value) and per-volume details."""
    if len(generated) < 2:
        raise EvaluationError(f"{len(generated)} generated volume(s): the set metrics need at least 2.")
    half = len(real) // 2
    floor, reference = list(real[:half]), list(real[half:])
    rows = {"generated": list(generated), "real (floor)": floor, **control_sets(floor, blur_sigma, seed)}
    _check_shapes({**rows, "real": reference})
    ref_features = features.extract(reference)
    name = features.name
    table: dict[str, dict[str, float]] = {}
    row_features = {}
    for row, vols in rows.items():
        feats = features.extract(vols)
        row_features[row] = feats
        precision, recall = precision_recall(ref_features, feats, k=knn)
        table[row] = {
            "MS-SSIM diversity": ms_ssim_diversity(vols, ms_ssim, max_pairs, seed),
            f"FID ({name})": fid(ref_features, feats),
            f"MMD ({name})": mmd(ref_features, feats),
            "precision": precision,
            "recall": recall,
            "histogram W1": histogram_distance(reference, vols, seed=seed),
        }
    table["real (reference)"] = {"MS-SSIM diversity": ms_ssim_diversity(reference, ms_ssim, max_pairs, seed)}
    counts = {k: len(v) for k, v in {**rows, "real (reference)": reference}.items()}
    result: dict[str, Any] = {"rows": table, "num_volumes": counts,
                              "feature_extractor": name}

    if training:
        nn_generated = nearest_neighbours(generated, training, ms_ssim)
        nn_real = nearest_neighbours(reference, floor, ms_ssim)  # nearest other real subject: the "no copy" level
        result["memorisation"] = {
            "generated_nearest_training": [{"index": i, "nearest": j, "ms_ssim": s}
                                           for i, (j, s) in enumerate(nn_generated)],
            "max_generated_to_training": max(s for _, s in nn_generated),
            "mean_real_to_nearest_real": float(np.mean([s for _, s in nn_real])),
            "max_real_to_nearest_real": max(s for _, s in nn_real),
        }

    if spacing is not None and real_params and all("params" in p for p in real_params):
        recorded = [known_truth.recorded_quantities(p["params"]) for p in real_params]
        estimated = {row: [known_truth.estimate_quantities(v.numpy(), spacing) for v in rows[row]]
                     for row in ("generated", "real (floor)")}
        truth = {}
        for q in known_truth.QUANTITIES:
            ref_values = [r[q] for r in recorded[half:]]
            truth[q] = {row: wasserstein_1d([e[q] for e in est], ref_values) for row, est in estimated.items()}
            truth[q]["generated mean"] = float(np.mean([e[q] for e in estimated["generated"]]))
            truth[q]["real recorded mean"] = float(np.mean(ref_values))
        result["known_truth"] = {"wasserstein": truth, "estimated": estimated, "recorded_reference": recorded[half:],
                                 "settings": known_truth.settings_dict()}
    return result


def run_evaluation(
    generated_dir: str | None,
    real_dataset: Dataset,
    output_dir: str,
    features: FeatureExtractor,
    ms_ssim: MSSSIM,
    training_items: Sequence[Mapping] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str = "RAS",
    runs: Sequence[str] = (),
    blur_sigma: float = 2.0,
    knn: int = 3,
    max_pairs: int = 64,
    seed: int = 0,
    write_eval_metrics: bool = False,
    metadata_file: str | None = None,
) -> Path:
    """The ``evaluate.json`` workflow: load both sets, compute :func:`evaluate_sets`, write ``metrics.json``,
    ``report.md`` and its figures into a new ``output_dir/evaluation_<time>/``; with ``write_eval_metrics``, also
    write the generated row into ``metadata_file``'s ``eval_metrics``. Returns the folder.

    ``real_dataset`` is the real split: its ``data`` (datalist items, with the demo's per-subject records) through
    its ``transform`` (the shared preprocessing chain, also applied to ``training_items``)."""
    from scripts.evaluation.report import write_report

    start = time.time()
    real_items, transform = list(real_dataset.data), real_dataset.transform
    files = generated_files(generated_dir, output_dir)
    generated = load_generated(files, orientation)
    real = load_real(real_items, transform)
    _check_shapes({"generated": generated, "real": real})  # before the slower steps
    same_split = training_items and [i["image"] for i in training_items] == [i["image"] for i in real_items]
    training = real if same_split else load_real(training_items, transform) if training_items else None
    result = evaluate_sets(generated, real, features, ms_ssim, training, spacing, real_items, blur_sigma, knn,
                           max_pairs, seed)
    manifest = files[0].parent / "manifest.json"
    control = json.loads(manifest.read_text()).get("control") if manifest.is_file() else None
    if control:  # a conditional generation: its control check (requested vs measured, scripts.evaluation.control)
        result["control"] = control
    result["generated_files"] = [str(f) for f in files]
    result["real_files"] = [str(i.get("image")) for i in real_items]
    result["seconds"] = round(time.time() - start, 1)
    folder = new_run_dir(output_dir, "evaluation")
    atomic_write_json(result, folder / "metrics.json")
    write_report(folder, result, generated, real, training, runs)
    if write_eval_metrics:
        write_eval_metrics_to(metadata_file, result)
    print(f"evaluation of {len(generated)} generated vs {len(real)} real volume(s): {folder}/report.md")
    for metric, value in result["rows"]["generated"].items():
        print(f"  {metric:<32} {value:10.4f}   real-vs-real floor {result['rows']['real (floor)'][metric]:10.4f}")
    return folder


def write_eval_metrics_to(metadata_file: str, result: Mapping) -> None:
    """Record the generated row (and the feature extractor's name) in ``metadata.json``'s ``eval_metrics``."""
    path = Path(metadata_file)
    meta = json.loads(path.read_text())
    meta["eval_metrics"] = {k: round(float(v), 6) for k, v in result["rows"]["generated"].items()}
    atomic_write_json(meta, path)
