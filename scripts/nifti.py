"""NIfTI writing with a correct affine (qform and sform), atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scripts.storage import atomic_write

__all__ = ["centered_ras_affine", "save_nifti"]


def centered_ras_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine ``diag(spacing)`` whose translation puts the volume centre at world (0, 0, 0)."""
    spacing = [float(s) for s in spacing]
    affine = np.diag(spacing + [1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    return affine


def save_nifti(volume: torch.Tensor | np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a ``(X, Y, Z)`` or ``(1, X, Y, Z)`` volume as float32 NIfTI with ``affine``, atomically."""
    import nibabel as nib

    data = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    data = data.astype(np.float32)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
