"""Deterministic synthetic "head MRI phantom" volumes with paired label maps.

The generator builds, per subject, a T1-ish head phantom on a ``size**3`` grid of isotropic
``spacing`` mm voxels and writes it as NIfTI (``.nii.gz``) with a proper RAS affine, together with a
Decathlon-style datalist JSON. It needs only numpy, nibabel and (for the command line) fire.

Anatomy, from outside in (all of it random per subject: shape, pose and contrast):

* an ellipsoidal head (semi-axes about 60-85 mm at the default 64 x 3 mm field of view; the
  anatomy scales with ``size * spacing / 192 mm``) with a small random rotation and shift,
* scalp, a bright-ish skull shell (3-6 mm) and a thin dark CSF layer,
* brain: a folded grey-matter cortex (random sulcal pattern) around a white-matter core
  (white matter brighter than grey matter), split at the top by a dark inter-hemispheric fissure,
* two dark lateral ventricles mirrored across the mid-sagittal plane (left/right is the first
  array axis ``x``),
* 0-3 bright (FLAIR-lesion-like) ellipsoidal lesions of radius ~4-12 mm inside the brain, kept away
  from the ventricles,
* a smooth multiplicative bias field (+-10-20 %), a slight blur and Rician noise.

Intensities are float32 with background near 0 and the noise-free maximum scaled to 1.

Label values (uint8):

* ``0`` background -- everything outside the brain, including scalp, skull and extra-cerebral CSF
* ``1`` brain -- grey and white matter
* ``2`` ventricles
* ``3`` lesion -- overrides brain

Arrays are stored in (x, y, z) order with x = left -> right, y = posterior -> anterior and
z = inferior -> superior, and the affine is ``diag(spacing, spacing, spacing, 1)`` with the volume
centre at world (0, 0, 0), so MONAI ``LoadImaged`` + ``Orientationd(axcodes="RAS")`` leaves the data
unchanged.

Subject ``i`` depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``), so changing the
number of subjects never changes the earlier ones.

Command line::

    python -m scripts.demo_data --output_dir data/demo --num_subjects 8 --size 32

From a MONAI bundle config (after ``"imports": ["$import scripts.demo_data"]``)::

    "datalist": "$scripts.demo_data.ensure_demo_data(@dataset_dir)"
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scripts.nifti import centered_affine, save_nifti
from scripts.storage import atomic_write

__all__ = [
    "GENERATOR_VERSION",
    "LABELS",
    "ensure_demo_data",
    "make_demo_dataset",
    "make_subject",
]

#: Bump whenever the generated images change, so that ``ensure_demo_data`` regenerates old data.
GENERATOR_VERSION = 1

#: Label value -> name, as written to the datalist.
LABELS: dict[str, str] = {"0": "background", "1": "brain", "2": "ventricles", "3": "lesion"}

#: Field of view (mm) at which the anatomical sizes in this module are quoted (64 voxels x 3 mm).
_REFERENCE_FOV_MM = 192.0

_DATALIST_NAME = "datalist.json"


# --------------------------------------------------------------------------------------------------
# small numpy helpers
# --------------------------------------------------------------------------------------------------
def _rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Return ``Rz @ Ry @ Rx`` for rotation angles (degrees) about the x, y and z axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Return a random proper rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid_sdist(x: np.ndarray, y: np.ndarray, z: np.ndarray, radii: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned, origin-centred ellipsoid.

    Uses the first-order estimate ``(rho - 1) / |grad rho|`` with ``rho`` the normalised ellipsoid
    radius; exact for spheres and accurate near the surface, which is where it is used.
    """
    a, b, c = (float(r) for r in radii)
    u, v, w = x / a, y / b, z / c
    rho = np.sqrt(u * u + v * v + w * w)
    # |grad rho| = sqrt(sum (u_i / r_i)^2) / rho, bounded by [1 / r_max, 1 / r_min]; at the centre use 1 / r_min
    grad_num = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    grad = np.divide(grad_num, rho, out=np.full_like(rho, 1.0 / min(a, b, c)), where=rho > 1e-6)
    return (rho - 1.0) / grad


def _soft(sdist: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume-like soft membership in [0, 1] from a signed distance (negative inside)."""
    t = np.clip(sdist / width, -30.0, 30.0)
    return (1.0 / (1.0 + np.exp(t))).astype(np.float32)


def _paint(image: np.ndarray, membership: np.ndarray, value: float) -> np.ndarray:
    """Overlay ``value`` on ``image`` with soft ``membership`` (painter's algorithm)."""
    return image + membership * (np.float32(value) - image)


def _gaussian_blur(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Separable Gaussian blur (edge padding) using numpy only."""
    if sigma_vox <= 0:
        return volume
    radius = max(1, int(math.ceil(3.0 * sigma_vox)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_vox) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    out = volume
    for axis in range(volume.ndim):
        n = out.shape[axis]
        pad = [(0, 0)] * volume.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        for k, weight in enumerate(kernel):
            acc += weight * np.take(padded, np.arange(k, k + n), axis=axis)
        out = acc
    return out


def _fold_pattern(rng: np.random.Generator, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
    """Random smooth field on the sphere of directions (about unit spread), left/right symmetric.

    Its zero-crossings form a maze-like network of curves that is used as the sulcal pattern.
    """
    pattern = np.zeros_like(ux)
    n_waves = 6
    ax = np.abs(ux)  # |x| keeps the cortex left/right symmetric, like the rest of the phantom
    for _ in range(n_waves):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        k = rng.uniform(10.0, 15.0)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        pattern += np.sin(k * (d[0] * ax + d[1] * uy + d[2] * uz) + phase)
    return pattern / math.sqrt(n_waves / 2.0)


def _to_builtin(value: Any) -> Any:
    """Recursively convert numpy scalars/arrays to plain Python for JSON."""
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    if isinstance(value, np.ndarray):
        return _to_builtin(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# --------------------------------------------------------------------------------------------------
# one subject, step by step (each step draws from ``rng`` in the order make_subject calls them)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """The voxel grid: ``size**3`` voxels of ``spacing`` mm, centred at world (0, 0, 0)."""

    size: int
    spacing: float
    scale: float  #: field of view relative to the 192 mm at which the anatomy is quoted
    coord: np.ndarray  #: voxel centres along one axis (mm), float32

    @classmethod
    def of(cls, size: int, spacing: float) -> _Grid:
        coord = ((np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * spacing).astype(np.float32)
        return cls(size, spacing, size * spacing / _REFERENCE_FOV_MM, coord)

    @property
    def soft_width(self) -> float:
        """Partial-volume transition width (mm)."""
        return 0.3 * self.spacing

    @property
    def voxel_ml(self) -> float:
        return self.spacing**3 / 1000.0

    def local_frame(self, origin_mm: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel coordinates in a frame at ``origin_mm`` rotated by ``rotation``: ``R^T (p_world - origin)``,
        three broadcastable float32 arrays."""
        wx = self.coord[:, None, None] - np.float32(origin_mm[0])
        wy = self.coord[None, :, None] - np.float32(origin_mm[1])
        wz = self.coord[None, None, :] - np.float32(origin_mm[2])
        r = rotation.astype(np.float32)
        return (r[0, 0] * wx + r[1, 0] * wy + r[2, 0] * wz,
                r[0, 1] * wx + r[1, 1] * wy + r[2, 1] * wz,
                r[0, 2] * wx + r[1, 2] * wy + r[2, 2] * wz)


@dataclass(frozen=True)
class _Head:
    """Head pose and shape, the layers outside the brain, and the head frame (coordinates ``hx, hy, hz``, mm)."""

    radii: np.ndarray
    rotation_deg: np.ndarray
    shift_mm: np.ndarray
    hx: np.ndarray
    hy: np.ndarray
    hz: np.ndarray
    t_scalp: float
    t_skull: float
    d_head: np.ndarray  #: signed distance (mm, negative inside) to the scalp surface
    d_skull_in: np.ndarray  #: to the inner surface of the skull
    brain_offset: float  #: scalp + skull + CSF thickness
    brain_radii: np.ndarray


@dataclass(frozen=True)
class _Ventricles:
    """The two lateral ventricles (mirrored across ``hx = 0``) and the geometry the fissure follows."""

    ry: float
    rz: float
    cz: float
    bend: float
    vy: np.ndarray
    d_vent: np.ndarray


def _draw_head(rng: np.random.Generator, grid: _Grid) -> _Head:
    """Head semi-axes, rotation and shift, then scalp, skull and CSF thickness (CSF: between skull and brain)."""
    scale, spacing = grid.scale, grid.spacing
    radii = np.array([rng.uniform(60, 72), rng.uniform(72, 85), rng.uniform(66, 80)]) * scale
    rotation_deg = np.array([rng.uniform(-6, 6), rng.uniform(-3, 3), rng.uniform(-3, 3)])
    shift_mm = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-4, 4), rng.uniform(-4, 4)]) * scale
    hx, hy, hz = grid.local_frame(shift_mm, _rotation_matrix(rotation_deg))
    t_scalp = rng.uniform(3.0, 5.0) * scale
    t_skull = max(rng.uniform(3.0, 6.0) * scale, 0.8 * spacing)
    t_csf = rng.uniform(1.5, 3.0) * scale
    d_head = _ellipsoid_sdist(hx, hy, hz, tuple(radii))
    brain_offset = t_scalp + t_skull + t_csf
    return _Head(radii, rotation_deg, shift_mm, hx, hy, hz, t_scalp, t_skull, d_head, d_head + (t_scalp + t_skull),
                 brain_offset, radii - brain_offset)


def _draw_brain(rng: np.random.Generator, grid: _Grid, head: _Head) -> tuple[np.ndarray, np.ndarray]:
    """Sulcal depth, cortex thickness and white-matter retreat, then the folding pattern: the signed distances to
    the brain (grey matter) surface and to the white matter."""
    scale = grid.scale
    sulcus_depth = rng.uniform(7.0, 11.0) * scale
    gm_thick = rng.uniform(5.0, 7.0) * scale  # cortex thickness under the gyral crowns
    wm_retreat = rng.uniform(4.0, 7.0) * scale  # how much deeper the white matter lies under a sulcus
    hx, hy, hz = head.hx, head.hy, head.hz
    norm = np.sqrt(hx * hx + hy * hy + hz * hz) + np.float32(1e-6)
    folds = _fold_pattern(rng, hx / norm, hy / norm, hz / norm)
    sulci = np.exp(-((folds / 0.45) ** 2))  # 1 on the zero-crossing curves (narrow grooves)
    d_brain = head.d_head + head.brain_offset + sulcus_depth * sulci
    d_wm = np.maximum(
        head.d_head + (head.brain_offset + gm_thick) + wm_retreat * np.exp(-((folds / 1.0) ** 2)),
        d_brain + 0.5 * gm_thick,  # grey matter also lines the sulci
    )
    return d_brain, d_wm


def _draw_ventricles(rng: np.random.Generator, grid: _Grid, head: _Head) -> _Ventricles:
    """Two ellipsoids mirrored across ``x_head = 0``, arched like lateral ventricles."""
    scale, spacing, brain_radii = grid.scale, grid.spacing, head.brain_radii
    v_rx = max(rng.uniform(4.0, 6.0) * scale, 0.65 * spacing)
    v_ry = rng.uniform(0.28, 0.36) * brain_radii[1]
    v_rz = max(rng.uniform(0.13, 0.19) * brain_radii[2], 0.65 * spacing)
    septum = rng.uniform(3.0, 5.0) * scale
    v_cx = septum / 2.0 + v_rx
    v_cy = rng.uniform(-0.05, 0.08) * brain_radii[1]
    v_cz = rng.uniform(0.08, 0.18) * brain_radii[2]
    v_bend = rng.uniform(0.15, 0.35) * v_rz / v_ry**2
    vy = head.hy - v_cy
    vz = head.hz - v_cz + v_bend * vy * vy
    d_vent = np.minimum(
        _ellipsoid_sdist(head.hx - v_cx, vy, vz, (v_rx, v_ry, v_rz)),
        _ellipsoid_sdist(head.hx + v_cx, vy, vz, (v_rx, v_ry, v_rz)),
    )
    return _Ventricles(v_ry, v_rz, v_cz, v_bend, vy, d_vent)


def _draw_fissure(rng: np.random.Generator, grid: _Grid, head: _Head, vent: _Ventricles,
                  d_brain: np.ndarray) -> np.ndarray:
    """Signed distance to the inter-hemispheric fissure (mid-sagittal CSF above the corpus callosum)."""
    scale = grid.scale
    fissure_half = max(rng.uniform(1.0, 2.0) * scale, 0.25 * grid.spacing)
    callosum = rng.uniform(5.0, 8.0) * scale
    # the fissure reaches down to the corpus callosum, which arches over the ventricles; in front of and
    # behind the callosum it reaches down to the level of the ventricles
    callosum_half_length = vent.ry * rng.uniform(1.05, 1.25)
    vy = vent.vy
    fissure_floor = np.maximum(
        vent.cz + vent.rz + callosum - vent.bend * vy * vy - 2.0 * np.maximum(np.abs(vy) - callosum_half_length, 0.0),
        vent.cz - vent.rz,
    )
    in_fissure_band = np.abs(head.hx) - fissure_half  # signed distance to the mid-sagittal slab
    return np.maximum(in_fissure_band, np.minimum(fissure_floor - head.hz, -(d_brain + 10.0 * scale)))


def _label_map(grid: _Grid, head: _Head, d_brain: np.ndarray, d_vent: np.ndarray, d_fissure: np.ndarray) -> np.ndarray:
    """Hard masks -> labels 0 (background), 1 (brain) and 2 (ventricles); no draws."""
    brain_mask = (d_brain < 0) & (head.d_skull_in < 0) & (d_fissure >= 0)
    vent_mask = (d_vent < 0) & (head.d_skull_in < 0)
    label = np.zeros((grid.size,) * 3, dtype=np.uint8)
    label[brain_mask] = 1
    label[vent_mask] = 2
    return label


def _draw_lesions(rng: np.random.Generator, grid: _Grid, label: np.ndarray, d_brain: np.ndarray, d_vent: np.ndarray,
                  d_fissure: np.ndarray) -> list[dict[str, Any]]:
    """0-3 ellipsoidal lesions in the brain, away from the ventricles, the fissure and each other; writes label 3
    into ``label`` and returns one dict per lesion placed."""
    scale, spacing, size = grid.scale, grid.spacing, grid.size
    n_lesions_wanted = int(rng.integers(0, 4))
    lesion_min_r = 0.75 * spacing
    lesions: list[dict[str, Any]] = []
    for _ in range(n_lesions_wanted):
        r_mean = max(rng.uniform(4.0, 12.0) * scale, lesion_min_r)
        radii = np.maximum(r_mean * rng.uniform(0.75, 1.25, size=3), lesion_min_r)
        contrast = float(rng.uniform(1.3, 1.7))
        orient = _random_rotation(rng)
        r_max = float(radii.max())
        candidates = (
            (d_brain < -(r_max + 2.0 * scale))
            & (d_vent > r_max + 2.0 * scale)
            & (d_fissure > r_max + 1.0 * scale)
            & (label == 1)
        )
        flat = np.flatnonzero(candidates)
        if flat.size == 0:
            continue
        placed = False
        for _attempt in range(20):
            center = np.array(np.unravel_index(int(flat[rng.integers(flat.size)]), label.shape))
            c_mm = (center - (size - 1) / 2.0) * spacing
            if all(np.linalg.norm(c_mm - o["center_mm"]) > r_max + o["r_max"] + 2.0 * scale for o in lesions):
                placed = True
                break
        if not placed:
            continue
        # lesion-local coordinates (world frame, rotated by the lesion orientation)
        d_les = _ellipsoid_sdist(*grid.local_frame(c_mm, orient), tuple(radii))
        les_mask = (d_les < 0) & (label == 1)
        if not les_mask.any():  # cannot happen (the centre voxel is brain), kept for safety
            continue
        label[les_mask] = 3
        lesions.append(
            {
                "center_vox": center.astype(int).tolist(),
                "center_mm": c_mm,
                "r_max": r_max,
                "radii_mm": radii,
                "contrast": contrast,
                "mask": les_mask,
                "soft": _soft(d_les, grid.soft_width),
            }
        )
    return lesions


def _draw_tissue_intensities(rng: np.random.Generator) -> dict[str, float]:
    """Base intensity of each tissue (before bias field, blur and noise)."""
    return {
        "scalp": rng.uniform(0.45, 0.60),
        "skull": rng.uniform(0.70, 0.85),
        "csf": rng.uniform(0.04, 0.12),
        "grey_matter": rng.uniform(0.36, 0.46),
        "white_matter": rng.uniform(0.64, 0.76),
    }


def _paint_tissues(grid: _Grid, tissue: dict[str, float], head: _Head, d_brain: np.ndarray, d_wm: np.ndarray,
                   d_fissure: np.ndarray, d_vent: np.ndarray, lesions: list[dict[str, Any]]) -> np.ndarray:
    """The noise-free image: each tissue painted over the outer ones with partial-volume memberships; no draws."""
    soft_w = grid.soft_width
    m_head = _soft(head.d_head, soft_w)
    m_skull_out = _soft(head.d_head + head.t_scalp, soft_w)
    m_intracranial = _soft(head.d_skull_in, soft_w)
    m_brain = _soft(d_brain, soft_w) * m_intracranial
    m_wm = _soft(d_wm, soft_w) * m_intracranial
    m_fissure = _soft(d_fissure, soft_w) * m_intracranial
    m_vent = _soft(d_vent, soft_w) * m_intracranial

    image = np.zeros((grid.size,) * 3, dtype=np.float32)
    image = _paint(image, m_head, tissue["scalp"])
    image = _paint(image, m_skull_out, tissue["skull"])
    image = _paint(image, m_intracranial, tissue["csf"])
    image = _paint(image, m_brain, tissue["grey_matter"])
    image = _paint(image, m_wm, tissue["white_matter"])
    image = _paint(image, m_fissure, tissue["csf"])
    image = _paint(image, m_vent, tissue["csf"])
    if lesions:
        m_parenchyma = m_brain * (1.0 - m_fissure) * (1.0 - m_vent)
        for les in lesions:
            image = _paint(image, les["soft"] * m_parenchyma, tissue["white_matter"] * les["contrast"])
    return image


def _draw_bias_field(rng: np.random.Generator, grid: _Grid, image: np.ndarray,
                     head_mask: np.ndarray) -> tuple[np.ndarray, float]:
    """A smooth multiplicative bias field (quadratic polynomial, peak amplitude drawn in the head); returns the
    image times the field and the amplitude."""
    bias_amp = rng.uniform(0.10, 0.20)
    half_fov = (grid.size - 1) / 2.0 * grid.spacing
    coord = grid.coord
    bx, by, bz = coord[:, None, None] / half_fov, coord[None, :, None] / half_fov, coord[None, None, :] / half_fov
    monomials = [bx, by, bz, bx * bx, by * by, bz * bz, bx * by, bx * bz, by * bz]
    coeffs = rng.standard_normal(len(monomials))
    field = sum(np.float32(c) * m for c, m in zip(coeffs, monomials, strict=True))
    field = np.broadcast_to(field, image.shape)
    field_max = float(np.abs(field[head_mask]).max()) if head_mask.any() else 1.0
    return image * (1.0 + np.float32(bias_amp / max(field_max, 1e-6)) * field), bias_amp


def _draw_rician_noise(rng: np.random.Generator, image: np.ndarray, apply: bool = True) -> tuple[np.ndarray, float]:
    """Rician noise of a drawn sigma: the magnitude of the image plus complex Gaussian noise; returns the noisy
    float32 image (the image itself unless ``apply``) and the sigma."""
    noise_sigma = float(rng.uniform(0.01, 0.03))
    if not apply:
        return image.astype(np.float32), noise_sigma
    n1 = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_sigma)
    n2 = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_sigma)
    return np.sqrt((image + n1) ** 2 + n2**2).astype(np.float32), noise_sigma


def _subject_params(grid: _Grid, head: _Head, head_mask: np.ndarray, label: np.ndarray,
                    lesions: list[dict[str, Any]], tissue: dict[str, float], intensity_scale: float,
                    bias_amp: float, noise_sigma: float) -> dict[str, Any]:
    """The generating parameters, volumes measured from the label map (the head's from ``head_mask``)."""

    def ml(count: int | np.integer) -> float:
        return round(int(count) * grid.voxel_ml, 6)

    params: dict[str, Any] = {
        "head_radii_mm": [round(float(v), 3) for v in head.radii],
        "head_volume_ml": ml(np.count_nonzero(head_mask)),
        "brain_volume_ml": ml(np.count_nonzero(label == 1)),
        "ventricle_volume_ml": ml(np.count_nonzero(label == 2)),
        "lesion_count": len(lesions),
        "lesion_volumes_ml": [ml(np.count_nonzero(les["mask"])) for les in lesions],
        "lesion_centers_vox": [les["center_vox"] for les in lesions],
        "lesion_radii_mm": [[round(float(v), 3) for v in les["radii_mm"]] for les in lesions],
        "lesion_contrast": [round(les["contrast"], 4) for les in lesions],
        "tissue_intensities": {k: round(float(v) / intensity_scale, 4) for k, v in tissue.items()},
        "rotation_deg": [round(float(v), 3) for v in head.rotation_deg],
        "shift_mm": [round(float(v), 3) for v in head.shift_mm],
        "skull_thickness_mm": round(float(head.t_skull), 3),
        "bias_field_amplitude": round(float(bias_amp), 4),
        "noise_sigma": round(noise_sigma, 5),
    }
    return _to_builtin(params)


def make_subject(rng: np.random.Generator, size: int = 64, spacing: float = 3.0,
                 noise: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Generate one random head phantom.

    Args:
        rng: random generator; the result is a deterministic function of its state.
        size: number of voxels along each axis (the volume is ``size**3``).
        spacing: isotropic voxel size in mm. Anatomical sizes scale with the field of view
            ``size * spacing`` relative to 192 mm (64 x 3 mm), but never drop below about a voxel.
        noise: add the Rician noise; ``False`` returns the noise-free image of the same subject (same label and
            params, ``noise_sigma`` included): what a perfect denoising reconstruction would aim at.

    Returns:
        ``(image, label, params)``: ``image`` float32 ``(size, size, size)`` in (x, y, z) = RAS order,
        background near 0 and noise-free maximum 1; ``label`` uint8 of the same shape (0 background,
        1 brain, 2 ventricles, 3 lesion); ``params`` a JSON-serialisable dict of the generating
        parameters. Volumes (``*_volume_ml``, ``lesion_volumes_ml``) are measured from the returned
        label map (``head_volume_ml`` from the head mask), so they are exact. ``tissue_intensities``
        are the base intensities before bias field, blur and noise, in the units of the returned image.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    grid = _Grid.of(int(size), float(spacing))
    # anatomy, outside in (the order of the draws is part of the data set: keep it)
    head = _draw_head(rng, grid)
    d_brain, d_wm = _draw_brain(rng, grid, head)
    vent = _draw_ventricles(rng, grid, head)
    d_fissure = _draw_fissure(rng, grid, head, vent, d_brain)
    head_mask = head.d_head < 0
    label = _label_map(grid, head, d_brain, vent.d_vent, d_fissure)
    lesions = _draw_lesions(rng, grid, label, d_brain, vent.d_vent, d_fissure)
    # intensities, then the scanner: slight blur (point-spread), bias field, scaling to max 1, Rician noise
    tissue = _draw_tissue_intensities(rng)
    image = _paint_tissues(grid, tissue, head, d_brain, d_wm, d_fissure, vent.d_vent, lesions)
    image, bias_amp = _draw_bias_field(rng, grid, _gaussian_blur(image, 0.5), head_mask)
    intensity_scale = float(image.max())
    image, noise_sigma = _draw_rician_noise(rng, image / np.float32(intensity_scale), apply=noise)
    params = _subject_params(grid, head, head_mask, label, lesions, tissue, intensity_scale, bias_amp, noise_sigma)
    return image, label, params


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------

def _split_sizes(num_subjects: int, num_validation: int, num_test: int) -> tuple[int, int, int]:
    """Return ``(n_train, n_validation, n_test)``, shrinking the held-out splits if no training subject is left.

    The requested sizes are kept whenever at least one training subject remains. Otherwise the held-out
    subjects are capped at ``num_subjects // 2``, taken alternately from the larger of the two splits.
    """
    if num_validation < 0 or num_test < 0:
        raise ValueError(f"num_validation and num_test must be non-negative, got {num_validation}, {num_test}")
    n_val, n_test = num_validation, num_test
    if num_subjects - n_val - n_test < 1:
        while n_val + n_test > num_subjects // 2:
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
    return num_subjects - n_val - n_test, n_val, n_test


def _generator_settings(
    num_subjects: int, size: int, spacing: float, seed: int, num_validation: int, num_test: int
) -> dict[str, Any]:
    return {
        "num_subjects": int(num_subjects),
        "size": int(size),
        "spacing": float(spacing),
        "seed": int(seed),
        "num_validation": int(num_validation),
        "num_test": int(num_test),
        "version": GENERATOR_VERSION,
    }


def make_demo_dataset(
    output_dir: str,
    num_subjects: int = 24,
    size: int = 64,
    spacing: float = 3.0,
    seed: int = 0,
    num_validation: int = 4,
    num_test: int = 4,
) -> str:
    """Generate the demo data set and its Decathlon-style datalist.

    Writes ``output_dir/imagesTr/demo_XXX.nii.gz`` (float32 images), ``output_dir/labelsTr/demo_XXX.nii.gz``
    (uint8 labels) and ``output_dir/datalist.json``, each atomically. Subject ``i`` is generated from
    ``np.random.default_rng([seed, i])``. The last ``num_validation + num_test`` subjects form the
    "validation" and then the "test" split; the rest is "training". If the requested splits would
    leave no training subject (e.g. 8 subjects with the default 4 + 4), they are shrunk so that about
    half of the subjects train (8 -> 4 / 2 / 2); ``"generator"`` still records the requested values. Files of subjects
    beyond ``num_subjects`` left over from an earlier, larger run are not deleted (nor listed).

    Args:
        output_dir: destination folder (created if needed).
        num_subjects: total number of subjects.
        size: voxels per axis.
        spacing: isotropic voxel size in mm.
        seed: base random seed.
        num_validation: number of validation subjects.
        num_test: number of test subjects.

    Returns:
        The path of the written datalist JSON.

    Raises:
        ValueError: if a setting is out of range (negative split size, ``num_subjects`` outside [1, 1000]).
    """
    num_subjects, size, seed = int(num_subjects), int(size), int(seed)
    num_validation, num_test, spacing = int(num_validation), int(num_test), float(spacing)
    if not 1 <= num_subjects <= 1000:
        raise ValueError(f"num_subjects must be in [1, 1000] (file names use three digits), got {num_subjects}")
    n_train, n_val, n_test = _split_sizes(num_subjects, num_validation, num_test)
    if (n_val, n_test) != (num_validation, num_test):
        print(
            f"[demo_data] num_validation={num_validation} + num_test={num_test} leave no training subject out of "
            f"{num_subjects}; using {n_train} training, {n_val} validation, {n_test} test subjects",
            flush=True,
        )

    output_dir = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    affine = centered_affine((size,) * 3, (spacing,) * 3)  # RAS, volume centre at world (0, 0, 0)

    entries = []
    for i in range(num_subjects):
        rng = np.random.default_rng([seed, i])
        image, label, params = make_subject(rng, size=size, spacing=spacing)
        name = f"demo_{i:03d}"
        image_rel = f"imagesTr/{name}.nii.gz"
        label_rel = f"labelsTr/{name}.nii.gz"
        save_nifti(image, affine, os.path.join(output_dir, image_rel), dtype=None)  # float32
        save_nifti(label, affine, os.path.join(output_dir, label_rel), dtype=None)  # uint8
        entries.append({"image": image_rel, "label": label_rel, "subject": name, "params": params})

    datalist = {
        "name": "demo_head_phantom",
        "description": (
            "Synthetic T1-like head MRI phantoms (scalp, skull, grey/white matter, ventricles, lesions) "
            "generated by scripts/demo_data.py"
        ),
        "labels": dict(LABELS),
        "tensorImageSize": "3D",
        "generator": _generator_settings(num_subjects, size, spacing, seed, num_validation, num_test),
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    datalist_path = os.path.join(output_dir, _DATALIST_NAME)

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(datalist, f, indent=2)
            f.write("\n")

    atomic_write(datalist_path, _write)
    return datalist_path


def _existing_datalist_matches(datalist_path: str, output_dir: str, settings: dict[str, Any]) -> bool:
    """True if ``datalist_path`` records ``settings`` and every file it lists exists."""
    try:
        with open(datalist_path) as f:
            datalist = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(datalist, dict) or datalist.get("generator") != settings:
        return False
    try:
        entries = [e for key in ("training", "validation", "test") for e in datalist.get(key, [])]
        if len(entries) != settings["num_subjects"]:
            return False
        return all(os.path.isfile(os.path.join(output_dir, e[k])) for e in entries for k in ("image", "label"))
    except (KeyError, TypeError, AttributeError):  # malformed entries: regenerate
        return False


def ensure_demo_data(
    output_dir: str,
    num_subjects: int = 24,
    size: int = 64,
    spacing: float = 3.0,
    seed: int = 0,
    num_validation: int = 4,
    num_test: int = 4,
) -> str:
    """Return the demo datalist path, generating the data only if it is missing or stale.

    The existing ``output_dir/datalist.json`` is reused when its ``"generator"`` settings equal the
    requested ones (including :data:`GENERATOR_VERSION`) and all the files it lists exist; otherwise
    the data set is (re)generated with :func:`make_demo_dataset`. Prints one line saying which.
    Suitable for a MONAI bundle config expression, e.g. ``"$scripts.demo_data.ensure_demo_data(@dataset_dir)"``.

    Args:
        output_dir: data folder.
        num_subjects: total number of subjects.
        size: voxels per axis.
        spacing: isotropic voxel size in mm.
        seed: base random seed.
        num_validation: number of validation subjects.
        num_test: number of test subjects.

    Returns:
        The path of the datalist JSON.
    """
    output_dir = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
    settings = _generator_settings(num_subjects, size, spacing, seed, num_validation, num_test)
    datalist_path = os.path.join(output_dir, _DATALIST_NAME)
    if _existing_datalist_matches(datalist_path, output_dir, settings):
        print(f"[demo_data] reusing existing demo data: {datalist_path}", flush=True)
        return datalist_path
    path = make_demo_dataset(output_dir, num_subjects, size, spacing, seed, num_validation, num_test)
    print(
        f"[demo_data] generated {settings['num_subjects']} demo subjects "
        f"({settings['size']}^3 @ {settings['spacing']} mm, seed {settings['seed']}): {path}",
        flush=True,
    )
    return path


if __name__ == "__main__":
    import fire

    fire.Fire(make_demo_dataset)
