"""NIfTI writing with a correct affine (qform and sform), atomically: generated volumes, reconstructions and the
demo data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import DTypeLike

from scripts.storage import atomic_write

__all__ = ["centered_affine", "save_nifti"]


def centered_affine(shape: Sequence[int], spacing: Sequence[float], orientation: str = "RAS") -> np.ndarray:
    """Affine of a volume whose voxel axes run along ``orientation`` (axis codes, e.g. ``RAS``, ``LPS``) with voxel
    size ``spacing``; the translation puts the volume centre at world (0, 0, 0)."""
    from nibabel.orientations import axcodes2ornt

    spacing = [float(s) for s in spacing]
    affine = np.eye(4)
    for axis, (world, flip) in enumerate(axcodes2ornt(tuple(orientation))):
        affine[int(world), axis] = flip * spacing[axis]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape[:3], dtype=float) - 1) / 2.0)
    return affine


def save_nifti(volume: torch.Tensor | np.ndarray, affine: np.ndarray, path: str | Path,
               dtype: DTypeLike | None = np.float32) -> Path:
    """Write a ``(X, Y, Z)`` or ``(1, X, Y, Z)`` volume as NIfTI-1 with ``affine`` as scanner-coded qform and sform
    (lengths in mm), atomically.

    Args:
        volume: image-space volume (a tensor is written as float32 before ``dtype`` applies).
        affine: 4x4 voxel-to-world (mm) matrix, e.g. :func:`centered_affine`.
        path: destination (``.nii`` or ``.nii.gz``).
        dtype: stored data type; ``None`` keeps the array's own (the demo data's uint8 label maps).

    Returns:
        The destination path.
    """
    import nibabel as nib

    data = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if dtype is not None:
        data = data.astype(dtype)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
