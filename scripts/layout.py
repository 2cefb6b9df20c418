"""3D box layouts with class names: reading and validating a layout file, its output grid, and rasterising its boxes
in world millimetres or voxels onto any grid (an instance label map, a class label map, or a base map painted over).

A layout (schema: ``scripts/schemas/layout.schema.json``)::

    {"space": "mm" | "voxel", "reference": "optional.nii.gz",
     "boxes": [{"class": "lesion", "center": [x, y, z], "size": [dx, dy, dz], "shape": "box" | "ellipsoid"}]}

In ``"mm"`` space a box is axis-aligned in world (RAS, millimetre) coordinates: a voxel belongs to it when its
centre, mapped through the grid's affine, lies inside; so a box lands on the same anatomy whatever the grid's
orientation, obliquity or spacing. In ``"voxel"`` space centres and sizes are in voxel indices of the output grid.
The output grid is the reference NIfTI's when the layout names one, else the training grid (``volume_size``,
``spacing``, ``orientation``, centred at the origin, as generated volumes are).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Box", "Layout", "SCHEMA_PATH", "box_mask", "output_grid", "paint", "rasterise", "read_layout"]

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "layout.schema.json"


@dataclass(frozen=True)
class Box:
    """One box: class name, centre and full size (mm or voxels, by the layout's space), box or ellipsoid."""

    cls: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    shape: str = "box"


@dataclass(frozen=True)
class Layout:
    """A validated layout: ``space``, optional ``reference`` (absolute path), ``boxes``, and ``source`` (its file)."""

    space: str
    boxes: tuple[Box, ...]
    reference: str | None = None
    source: str = "layout"

    def describe(self, index: int) -> str:
        box = self.boxes[index]
        unit = "mm" if self.space == "mm" else "voxels"
        return f"box {index} ('{box.cls}', center {list(box.center)} {unit}, size {list(box.size)} {unit})"


def _where(error: Any) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                   for i, p in enumerate(error.absolute_path))
    return path or "the top level"


def read_layout(layout: str | Path | Mapping[str, Any], classes: Sequence[str] | None = None) -> Layout:
    """Read and validate a layout file (or an already parsed mapping).

    Args:
        layout: path of a layout JSON file, or its content.
        classes: the class names the model knows; a box naming another class is refused (``None``: any name).

    Raises:
        FileNotFoundError: the file (or its reference NIfTI) does not exist.
        ValueError: malformed JSON, a schema violation (empty layout, non-positive size, unknown key, wrong
            space...) or an unknown class; one line naming the file, the box and the fix.
    """
    import jsonschema

    if isinstance(layout, Mapping):
        content, source, base = dict(layout), "layout", Path.cwd()
    else:
        path = Path(layout)
        source, base = str(path), path.resolve().parent
        if not path.is_file():
            raise FileNotFoundError(f"layout file '{path}' not found; fix the layouts list.")
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"layout {source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.") from e
    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(content), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        hint = {"minItems": "give at least one box" if list(e.path) == ["boxes"] else "give 3 values (x, y, z)",
                "exclusiveMinimum": "sizes must be positive", "enum": f"use one of {e.validator_value}",
                "required": "see scripts/schemas/layout.schema.json", "additionalProperties": "remove the key",
                "maxItems": "give 3 values (x, y, z)"}.get(e.validator, "see scripts/schemas/layout.schema.json")
        raise ValueError(f"layout {source}: {_where(e)}: {e.message}; {hint}.")
    boxes = tuple(Box(b["class"], tuple(float(v) for v in b["center"]), tuple(float(v) for v in b["size"]),
                      b.get("shape", "box")) for b in content["boxes"])
    result = Layout(content["space"], boxes, None, source)
    if classes is not None:
        for i, box in enumerate(boxes):
            if box.cls not in classes:
                raise ValueError(f"layout {source}: {result.describe(i)} names a class the model was not trained on; "
                                 f"use one of {list(classes)}.")
    if content.get("reference"):
        reference = Path(content["reference"])
        reference = reference if reference.is_absolute() else base / reference
        if not reference.is_file():
            raise FileNotFoundError(f"layout {source}: reference '{content['reference']}' not found (relative paths "
                                    "start at the layout file's folder).")
        result = Layout(result.space, boxes, str(reference), source)
    return result


def output_grid(layout: Layout, volume_size: Sequence[int], spacing: Sequence[float],
                orientation: str = "RAS") -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the output: the reference NIfTI's grid (header only), else the training grid centred
    at the origin."""
    if layout.reference:
        import nibabel as nib

        header = nib.load(layout.reference)
        return tuple(int(s) for s in header.shape[:3]), np.asarray(header.affine, dtype=np.float64)
    from scripts.nifti import centered_affine

    shape = tuple(int(s) for s in volume_size)
    return shape, centered_affine(shape, spacing, orientation)


def _voxel_range(box: Box, space: str, shape: Sequence[int], affine: np.ndarray) -> list[slice]:
    """The voxel index ranges that can hold the box (its corners mapped to voxel space), clipped to the grid."""
    half = np.asarray(box.size) / 2.0
    corners = np.array([[box.center[a] + s[a] * half[a] for a in range(3)]
                        for s in np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, -1).T])
    if space == "mm":
        corners = (np.linalg.inv(affine) @ np.c_[corners, np.ones(len(corners))].T).T[:, :3]
    lo = np.clip(np.floor(corners.min(0)).astype(int), 0, np.asarray(shape))
    hi = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, np.asarray(shape))
    return [slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)]


def box_mask(box: Box, space: str, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Boolean ``shape`` mask of the voxels whose centres lie inside the box (or ellipsoid)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    region = _voxel_range(box, space, shape, affine)
    if any(r.stop <= r.start for r in region):
        return mask
    idx = np.stack(np.meshgrid(*[np.arange(r.start, r.stop) for r in region], indexing="ij"), -1).astype(np.float64)
    points = idx @ affine[:3, :3].T + affine[:3, 3] if space == "mm" else idx
    d = (points - np.asarray(box.center)) / (np.asarray(box.size) / 2.0)
    inside = (d**2).sum(-1) <= 1.0 if box.shape == "ellipsoid" else (np.abs(d) <= 1.0).all(-1)
    mask[tuple(region)] = inside
    return mask


def rasterise(layout: Layout, shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """The instance label map of the layout on a grid (box ``i`` has id ``i + 1``; later boxes overwrite earlier
    ones where they overlap) and ``{id: class}``.

    Raises:
        ValueError: a box covers no voxel of the grid (outside the volume, or thinner than a voxel), naming it.
    """
    instances = np.zeros(tuple(shape), dtype=np.int32)
    for i, box in enumerate(layout.boxes):
        mask = box_mask(box, layout.space, shape, affine)
        if not mask.any():
            fov = np.asarray(shape) * np.linalg.norm(affine[:3, :3], axis=0)
            raise ValueError(f"layout {layout.source}: {layout.describe(i)} covers no voxel of the output grid "
                             f"({list(shape)} voxels, field of view {fov.round(1).tolist()} mm): it lies outside the "
                             "volume or is thinner than a voxel; move or enlarge it.")
        instances[mask] = i + 1
    return instances, {i + 1: box.cls for i, box in enumerate(layout.boxes)}


def paint(base: np.ndarray, layout: Layout, affine: np.ndarray, classes: Mapping[int, str]) -> np.ndarray:
    """``base`` (a label map on the output grid) with each box painted in its class's label value.

    Raises:
        ValueError: a box names a class that is not in ``classes`` (``{value: name}``), or covers no voxel.
    """
    values = {name: int(v) for v, name in classes.items()}
    unknown = [i for i, b in enumerate(layout.boxes) if b.cls not in values]
    if unknown:
        raise ValueError(f"layout {layout.source}: {layout.describe(unknown[0])} names a class that is not in the "
                         f"label vocabulary {list(values)}.")
    instances, names = rasterise(layout, base.shape, affine)
    painted = np.array(base, copy=True)
    for index, name in names.items():
        painted[instances == index] = values[name]
    return painted
