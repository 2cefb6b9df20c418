"""Known-truth checks on the demo phantom: a simple threshold segmentation of a volume, and its comparison with the
generating parameters recorded in the demo datalist.

The segmentation is written for the phantoms of :mod:`scripts.demo_data` *after the shared preprocessing* (intensities
in [0, 1], the 99.5th percentile scaled to 1 and clipped), which is what the evaluation feeds it, and it uses the
image alone, so that it works the same on real and generated volumes. Every threshold is a fraction of an intensity
level measured on the volume itself, and every boundary is put half-way between the two levels it separates (the
partial-volume midpoint):

1. **head**: voxels above ``head_fraction`` x the median foreground intensity (foreground: above the Otsu threshold),
   holes filled, largest connected component. ``depth``: Euclidean distance (mm) of every head voxel to its surface.
2. **skull**: the median intensity as a function of depth rises from the scalp to the bright skull and falls to the
   dark CSF under it; the depth where it falls half-way from the skull peak to that dip is the inner edge of the
   skull. Everything deeper than the edge plus ``skull_margin_mm`` (the skull's partial-volume rim) is intracranial.
   Scalp and skull thickness vary per subject (6-11 mm), so the edge is measured, not assumed.
3. **white-matter level** ``W(x)`` (the bias field): a quadratic polynomial fitted, by least absolute deviations,
   to the white-matter core -- intracranial voxels between ``wm_low`` and ``wm_high`` x the current fit, eroded
   ``wm_erosion_vox`` times to drop partial-volume voxels -- four times over. A median fit ignores the lesions and
   the white-matter voxels that the percentile scaling clipped to 1 (clipping does not move a median below 1); a
   quadratic is the usual low-order model of a coil's bias field, and unlike a local average it is not pulled down
   at the edge of the brain. ``r = image / W`` is the bias-corrected image (white matter about 1).
4. **lesions**: the lesions are 1.3-1.7 x white matter, but the percentile scaling clips them to 1, so where the
   bias field brightens the white matter their contrast falls to a few per cent. The image is opened (grey-scale,
   6-neighbour cross: drops bright noise voxels, keeps bright plateaus), lightly smoothed (``lesion_smooth_vox``)
   and divided by ``W``. Candidates: connected components, deeper than ``lesion_margin_mm`` inside the
   intracranial region, above ``1 + max(lesion_level - 1, median + lesion_spread x sigma)`` where median and sigma
   (1.4826 x MAD) describe the white-matter core in this image (the level rises with a smooth, noisy texture and
   stays at ``lesion_level`` on noise-free volumes). A candidate is kept when its excess ``sum(. - 1) x voxel
   volume`` (volume x contrast) reaches ``lesion_min_excess_ml``: a noise speck or a bias-field ripple has far less.
   Each kept candidate is cut at its half maximum (``1 + lesion_core x (peak - 1)``); the connected pieces are the
   lesions (two lesions joined by their halo count as two) and their number is the lesion count.
5. **ventricles**: deep (``ventricle_depth`` x the deepest point of the head) intracranial voxels darker than a
   threshold, in 6-connected components that hold a seed: a voxel darker than ``ventricle_seed`` surviving a
   binary opening by the 6-neighbour cross (``ventricle_opening_mm``). The opening keeps the lateral ventricles
   (2-4 voxels across) and drops the inter-hemispheric fissure and the sulci (sheets about a voxel thick), which
   are as dark but are not ventricles. The threshold is ``ventricle_start`` first, then half-way
   (``ventricle_level``) between the CSF level seen in the core of the ventricles found (median of the eroded
   mask) and white matter: the half maximum of a thin dark structure, whatever its contrast.
6. **brain**: the other intracranial voxels brighter than half-way (``brain_level``) between that CSF level and the
   grey-matter level (median of ``r`` within ``gm_band``), i.e. grey and white matter; the labels count lesions
   and ventricles apart.

Volumes are in ml (voxel count x voxel volume), the units of the demo datalist's ``params``. Lengths are quoted for
the 192 mm demo field of view and scale with the volume's field of view, as the phantom's anatomy does.

Accuracy on real demo phantoms, 64^3 at 3 mm through the shared preprocessing (mean relative error; lesion count:
fraction of subjects exactly right), seeds 0, 7, 31 and 123 (48 subjects each) and 2024 (28): head 0.45-0.62 %,
brain 1.4-1.6 %, ventricles 1.4-2.1 %, lesion count exact 92-100 % per seed, 97.7 % of all 220 subjects. The misses
are mostly lesions in white matter that the bias field brightens to within 1.5 % of the clipping level (invisible
to any threshold), a 10-voxel lesion that the opening removes, and one beside large lesions that bend the
white-matter fit. The same phantoms without their noise give the same numbers. Gaussian-blurred by 0.7 voxel
(generated volumes are smoother than real ones): head 2 %, brain 2 %, ventricles 7 %, lesion count exact 83-100 %;
by 1 voxel: head 4 %, brain 4 %, ventricles 19-20 % (a blur widens a thin dark structure at its half maximum),
lesion count exact 75-96 % (the smallest lesions fade, close ones merge). Lesion volume is the roughest quantity
(40-90 %): a clipped lesion has no true maximum to take the half of. ``tests/test_known_truth.py`` checks seed 2024.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["QUANTITIES", "SegmentationSettings", "accuracy", "estimate_quantities", "recorded_quantities", "segment",
           "settings_dict"]

#: estimated quantity -> how to read it from a demo datalist entry's ``params``
QUANTITIES = ("head_volume_ml", "brain_volume_ml", "ventricle_volume_ml", "lesion_volume_ml", "lesion_count")

_REFERENCE_FOV_MM = 192.0


@dataclass(frozen=True)
class SegmentationSettings:
    """Thresholds of the known-truth segmentation (fractions of intensity levels measured on each volume; lengths in
    mm at the 192 mm demo field of view, scaled with the volume's field of view; smoothing in voxels)."""

    head_fraction: float = 0.45
    shell_mm: float = 11.0  # fallback intracranial depth when no skull is found in the depth profile
    skull_margin_mm: float = 2.5
    wm_low: float = 0.85
    wm_high: float = 1.15
    wm_erosion_vox: int = 2
    lesion_smooth_vox: float = 0.5
    lesion_level: float = 1.01
    lesion_spread: float = 3.0
    lesion_min_excess_ml: float = 0.0075
    lesion_core: float = 0.5
    lesion_margin_mm: float = 3.0
    ventricle_depth: float = 0.55
    ventricle_opening_mm: float = 3.0
    ventricle_seed: float = 0.625
    ventricle_start: float = 0.55
    ventricle_level: float = 0.5
    brain_level: float = 0.5
    gm_band: tuple[float, float] = (0.35, 0.85)


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


def _skull_inner_edge(v: np.ndarray, head: np.ndarray, depth: np.ndarray, fov_scale: float) -> float | None:
    """Depth (mm) where the median intensity falls half-way from the skull peak to the CSF dip under it, or None."""
    quantum = 0.5 * fov_scale  # depths of voxel centres are discrete; group them finely
    d = np.round(depth[head] / quantum) * quantum
    values = v[head]
    levels = np.unique(d[(d > 0) & (d < 30.0 * fov_scale)])
    profile = []
    for level in levels:
        sel = values[d == level]
        profile.append(float(np.median(sel)) if sel.size >= 30 else np.nan)
    profile = np.asarray(profile)
    ok = np.isfinite(profile)
    levels, profile = levels[ok], profile[ok]
    if profile.size < 4:
        return None
    # the skull peak: the first maximum, once the profile has fallen 15 % below it
    peak, top = 0, -np.inf
    for j, p in enumerate(profile):
        if p > top:
            peak, top = j, p
        elif p < 0.85 * top:
            break
    after = (levels > levels[peak]) & (levels < levels[peak] + 12.0 * fov_scale)
    if not after.any():
        return None
    dip = int(np.argmin(np.where(after, profile, np.inf)))
    half = 0.5 * (profile[peak] + profile[dip])
    j = peak
    while j < dip and profile[j + 1] >= half:
        j += 1
    if j >= dip:
        return None
    x0, x1, y0, y1 = levels[j], levels[j + 1], profile[j], profile[j + 1]
    return float(x0 + (y0 - half) / max(y0 - y1, 1e-6) * (x1 - x0))


def _quadratic_basis(shape: Sequence[int]) -> list[np.ndarray]:
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij")
    return [np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]


def _median_fit(basis: Sequence[np.ndarray], mask: np.ndarray, values: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Least-absolute-deviation fit (iteratively reweighted least squares) of ``values[mask]`` on ``basis``."""
    a = np.stack([b[mask] for b in basis], 1).astype(np.float64)
    y = values[mask].astype(np.float64)
    w = np.ones_like(y)
    coef = np.zeros(a.shape[1])
    for _ in range(iterations):
        aw = a * w[:, None]
        coef = np.linalg.lstsq(a.T @ aw, aw.T @ y, rcond=None)[0]
        w = 1.0 / np.maximum(np.abs(y - a @ coef), 1e-3)
    return sum(float(c) * b for c, b in zip(coef, basis, strict=True)).astype(np.float32)


def _white_matter_level(v: np.ndarray, intracranial: np.ndarray,
                        s: SegmentationSettings) -> tuple[np.ndarray, np.ndarray]:
    """The bias field -- white-matter intensity as a smooth (quadratic) function of position -- and the white-matter
    core it was fitted to."""
    from scipy import ndimage

    level = np.full(v.shape, float(np.percentile(v[intracranial], 75)), dtype=np.float32)
    smooth = ndimage.gaussian_filter(v, 0.7)
    basis = _quadratic_basis(v.shape)
    core = intracranial
    for _ in range(4):
        band = intracranial & (smooth > s.wm_low * level) & (smooth < s.wm_high * level)
        eroded = ndimage.binary_erosion(band, iterations=s.wm_erosion_vox) if s.wm_erosion_vox > 0 else band
        if eroded.sum() < 50:
            break
        core = eroded
        level = _median_fit(basis, core, v)
    return np.maximum(level, 1e-3), core


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
    result = {"head": empty, "brain": empty, "ventricles": empty, "lesions": empty,
              "lesion_labels": np.zeros(v.shape, dtype=np.int32)}
    foreground = v[v > _otsu(v.ravel())]
    if foreground.size == 0:
        return result
    # holes filled first: where the CSF under the skull is resolved, it separates the brain from the skull
    head = _largest_component(ndimage.binary_fill_holes(v > s.head_fraction * float(np.median(foreground))))
    result["head"] = head
    depth = ndimage.distance_transform_edt(head, sampling=spacing)
    fov_scale = float(np.mean(np.array(v.shape) * np.array(spacing))) / _REFERENCE_FOV_MM
    edge = _skull_inner_edge(v, head, depth, fov_scale)
    shell = s.shell_mm * fov_scale if edge is None else edge + s.skull_margin_mm * fov_scale
    intracranial = depth > shell
    if intracranial.sum() < 50:
        return result
    wm, wm_core = _white_matter_level(v, intracranial, s)
    r = v / wm
    voxel_ml = float(np.prod(spacing)) / 1000.0
    cross = ndimage.generate_binary_structure(3, 1)

    # lesions: bright plateaus over the local white matter, cut at their half maximum
    bright = ndimage.gaussian_filter(ndimage.grey_opening(v, footprint=cross), s.lesion_smooth_vox) / wm
    spread = bright[wm_core] - 1.0  # the white matter's own texture (noise, ripples) in this image
    centre = float(np.median(spread))
    sigma = 1.4826 * float(np.median(np.abs(spread - centre)))
    level = 1.0 + max(s.lesion_level - 1.0, centre + s.lesion_spread * sigma)
    candidates, n = ndimage.label((bright > level) & (depth > shell + s.lesion_margin_mm * fov_scale))
    lesion_labels = np.zeros(v.shape, dtype=np.int32)
    if n:
        index = np.arange(1, n + 1)
        excess = ndimage.sum(bright - 1.0, candidates, index) * voxel_ml
        peaks = ndimage.maximum(bright, candidates, index)
        count = 0
        for j, e, p in zip(index, excess, peaks, strict=True):
            if e < s.lesion_min_excess_ml * fov_scale**3:
                continue
            cores, k = ndimage.label((candidates == j) & (bright > 1.0 + s.lesion_core * (p - 1.0)))
            for c in range(1, k + 1):
                count += 1
                lesion_labels[cores == c] = count
    lesions = lesion_labels > 0

    # ventricles: deep dark blobs thicker than a voxel (the fissure and the sulci are thinner)
    deep = intracranial & (depth > s.ventricle_depth * float(depth.max()))

    opening = max(1, int(s.ventricle_opening_mm * fov_scale / float(np.mean(spacing))))
    seeds = ndimage.binary_opening(deep & (r < s.ventricle_seed), structure=cross, iterations=opening)

    def dark_blobs(threshold: float) -> np.ndarray:
        labels, _ = ndimage.label(deep & (r < threshold), structure=cross)
        keep = np.unique(labels[seeds])
        return np.isin(labels, keep[keep > 0])

    ventricles = dark_blobs(s.ventricle_start)
    csf = None
    if ventricles.any():
        inner = ndimage.binary_erosion(ventricles, structure=cross)
        csf = float(np.median(r[inner])) if inner.any() else float(np.percentile(r[ventricles], 10))
        ventricles = dark_blobs(csf + s.ventricle_level * (1.0 - csf))

    # brain: grey and white matter, half-way between CSF and grey matter
    ri = r[intracranial]
    in_band = ri[(ri > s.gm_band[0]) & (ri < s.gm_band[1])]
    gm = float(np.median(in_band)) if in_band.size else 0.6
    csf = 0.15 if csf is None else csf
    brain = intracranial & (r >= csf + s.brain_level * (gm - csf)) & ~ventricles & ~lesions
    result.update(brain=brain, ventricles=ventricles, lesions=lesions, lesion_labels=lesion_labels)
    return result


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


def accuracy(estimated: Sequence[Mapping[str, float]], recorded: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """How well estimates recover the recorded quantities: the mean relative error of each volume (over subjects
    whose recorded value is positive; NaN when none is) and ``lesion_count_exact``, the fraction of subjects whose
    lesion count is exactly right."""
    pairs = list(zip(estimated, recorded, strict=True))
    out = {}
    for q in QUANTITIES[:-1]:
        errors = [abs(e[q] - r[q]) / r[q] for e, r in pairs if r[q] > 0]
        out[q] = float(np.mean(errors)) if errors else float("nan")
    out["lesion_count_exact"] = float(np.mean([e["lesion_count"] == r["lesion_count"] for e, r in pairs]))
    return out


def settings_dict(settings: SegmentationSettings | None = None) -> dict:
    """The thresholds as a plain dict (recorded in ``metrics.json``)."""
    return asdict(settings or SegmentationSettings())
