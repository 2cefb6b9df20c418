"""Known-truth checks on the demo phantom: a simple threshold segmentation of a volume, and its comparison with the
generating parameters recorded in the demo datalist.

The segmentation is written for the phantoms of :mod:`scripts.demo_data` (intensities in [0, 1] after the shared
preprocessing) and is deliberately simple, so that it works the same on real and generated volumes:

1. **head**: voxels above ``head_fraction`` x the median foreground intensity (foreground: above the Otsu threshold),
   largest connected component, holes filled.
2. **depth**: Euclidean distance (mm) of every head voxel to the head surface. Everything deeper than the scalp,
   skull and CSF layer (``shell_mm``, quoted for the 192 mm demo field of view and scaled with it) is intracranial.
3. **white-matter level** ``wm``: the ``wm_percentile`` percentile of the intracranial intensities.
4. **lesions**: voxels (lightly smoothed) brighter than ``lesion_ratio`` x the local white-matter level (a smooth
   average of the voxels near ``wm``, which follows the bias field), ``lesion_margin_mm`` deeper than the shell,
   in connected components of at least ``min_lesion_ml``; their number is the lesion count. Lesions are 1.3-1.7 x
   white matter before preprocessing, but the shared percentile scaling clips them to 1, so this step is the
   roughest: on the 24 default demo subjects the count is exact for about 40 % and within one for about 80 %.
5. **ventricles**: intracranial voxels darker than ``csf_fraction`` x ``wm`` deeper than ``ventricle_depth`` x the
   deepest point of the head (the sulci and the fissure are shallower).
6. **brain**: the other intracranial voxels brighter than ``brain_fraction`` x ``wm`` (grey and white matter;
   the labels count lesions and ventricles apart).

Volumes are in ml (voxel count x voxel volume), the units of the demo datalist's ``params``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["QUANTITIES", "SegmentationSettings", "estimate_quantities", "recorded_quantities", "wasserstein_1d"]

#: estimated quantity -> how to read it from a demo datalist entry's ``params``
QUANTITIES = ("head_volume_ml", "brain_volume_ml", "ventricle_volume_ml", "lesion_volume_ml", "lesion_count")

_REFERENCE_FOV_MM = 192.0


@dataclass(frozen=True)
class SegmentationSettings:
    """Thresholds of the known-truth segmentation (fractions of intensity levels measured on each volume; lengths in
    mm at the 192 mm demo field of view, scaled with the volume's field of view)."""

    head_fraction: float = 0.45
    shell_mm: float = 11.0
    wm_percentile: float = 75.0
    brain_fraction: float = 0.4
    csf_fraction: float = 0.5
    ventricle_depth: float = 0.55
    lesion_ratio: float = 1.09
    lesion_margin_mm: float = 3.0
    min_lesion_ml: float = 0.15


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def segment(volume: np.ndarray, spacing: Sequence[float], settings: SegmentationSettings | None = None) -> dict:
    """Head, brain, ventricle and lesion masks of one phantom-like volume.

    Args:
        volume: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` image in [0, 1] (image space, after the shared preprocessing).
        spacing: voxel size in mm.
        settings: thresholds (default :class:`SegmentationSettings`).

    Returns:
        ``{"head", "brain", "ventricles", "lesions"}`` boolean masks and ``"lesion_labels"`` (int array, one label
        per lesion, 0 elsewhere).
    """
    from scipy import ndimage

    s = settings or SegmentationSettings()
    v = np.asarray(volume, dtype=np.float32)
    v = v[0] if v.ndim == 4 else v
    spacing = [float(x) for x in spacing]
    empty = np.zeros(v.shape, dtype=bool)
    foreground = v[v > _otsu(v.ravel())]
    if foreground.size == 0:
        return {"head": empty, "brain": empty, "ventricles": empty, "lesions": empty,
                "lesion_labels": empty.astype(int)}
    head = ndimage.binary_fill_holes(_largest_component(v > s.head_fraction * float(np.median(foreground))))
    depth = ndimage.distance_transform_edt(head, sampling=spacing)
    fov_scale = float(np.mean(np.array(v.shape) * np.array(spacing))) / _REFERENCE_FOV_MM
    intracranial = depth > s.shell_mm * fov_scale
    if not intracranial.any():
        return {"head": head, "brain": empty, "ventricles": empty, "lesions": empty, "lesion_labels": empty.astype(int)}
    wm = float(np.percentile(v[intracranial], s.wm_percentile))
    # lesions: brighter than the local white matter (the bias field varies it by +-20 %)
    smooth = ndimage.gaussian_filter(v, 0.7)
    wm_band = intracranial & (smooth > 0.8 * wm) & (smooth < 1.05 * wm)
    local_wm = ndimage.gaussian_filter(np.where(wm_band, smooth, 0.0), 3.0) / np.maximum(
        ndimage.gaussian_filter(wm_band.astype(np.float32), 3.0), 1e-3)
    bright = ((smooth > s.lesion_ratio * np.maximum(local_wm, 1e-3))
              & (depth > (s.shell_mm + s.lesion_margin_mm) * fov_scale))
    labels, n = ndimage.label(bright)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    min_voxels = max(1, round(s.min_lesion_ml * fov_scale**3 / (np.prod(spacing) / 1000.0)))
    keep = [i for i in range(1, n + 1) if sizes[i] >= min_voxels]
    lesion_labels = np.zeros(v.shape, dtype=np.int32)
    for new, old in enumerate(keep, start=1):
        lesion_labels[labels == old] = new
    lesions = lesion_labels > 0
    ventricles = intracranial & (v < s.csf_fraction * wm) & (depth > s.ventricle_depth * float(depth.max()))
    brain = intracranial & (v >= s.brain_fraction * wm) & ~ventricles & ~lesions
    return {"head": head, "brain": brain, "ventricles": ventricles, "lesions": lesions, "lesion_labels": lesion_labels}


def estimate_quantities(volume: np.ndarray, spacing: Sequence[float],
                        settings: SegmentationSettings | None = None) -> dict[str, float]:
    """Head, brain, ventricle and total lesion volume (ml) and lesion count of one volume, from :func:`segment`."""
    masks = segment(volume, spacing, settings)
    voxel_ml = float(np.prod([float(x) for x in spacing])) / 1000.0
    return {
        "head_volume_ml": float(masks["head"].sum()) * voxel_ml,
        "brain_volume_ml": float(masks["brain"].sum()) * voxel_ml,
        "ventricle_volume_ml": float(masks["ventricles"].sum()) * voxel_ml,
        "lesion_volume_ml": float(masks["lesions"].sum()) * voxel_ml,
        "lesion_count": float(masks["lesion_labels"].max()),
    }


def recorded_quantities(params: Mapping) -> dict[str, float]:
    """The same quantities as :func:`estimate_quantities`, read from a demo datalist entry's ``params``."""
    return {
        "head_volume_ml": float(params["head_volume_ml"]),
        "brain_volume_ml": float(params["brain_volume_ml"]),
        "ventricle_volume_ml": float(params["ventricle_volume_ml"]),
        "lesion_volume_ml": float(sum(params.get("lesion_volumes_ml", []))),
        "lesion_count": float(params["lesion_count"]),
    }


def wasserstein_1d(a: Sequence[float], b: Sequence[float]) -> float:
    """Wasserstein-1 (earth mover's) distance between two 1-D empirical distributions, in the values' units."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))


def settings_dict(settings: SegmentationSettings | None = None) -> dict:
    """The thresholds as a plain dict (recorded in ``metrics.json``)."""
    return asdict(settings or SegmentationSettings())
