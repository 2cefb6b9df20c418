"""3D box layouts: the documented format and its refusals, and rasterisation in voxel and world-millimetre space on
grids of any orientation, spacing and origin."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from scripts import layout as lay
from scripts.nifti import centered_affine

CLASSES = ("brain", "ventricles", "lesion")


def write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_voxel_boxes_and_ellipsoids_land_on_their_voxels():
    layout = lay.read_layout({"space": "voxel", "boxes": [
        {"class": "lesion", "center": [8, 8, 8], "size": [4, 4, 4]},
        {"class": "lesion", "center": [3, 3, 3], "size": [4, 4, 4], "shape": "ellipsoid"}]}, CLASSES)
    instances, names = lay.rasterise(layout, (16, 16, 16), np.eye(4))
    assert names == {1: "lesion", 2: "lesion"}
    box = np.argwhere(instances == 1)
    assert len(box) == 125 and box.min(0).tolist() == [6, 6, 6] and box.max(0).tolist() == [10, 10, 10]
    ellipsoid = instances == 2
    assert ellipsoid[3, 3, 3] and ellipsoid[1, 3, 3] and not ellipsoid[1, 1, 3]  # radius 2: the axis, not the corner
    assert 0 < ellipsoid.sum() < 125


def test_mm_boxes_follow_world_coordinates_on_an_lps_anisotropic_grid(tmp_path):
    """A box given in world millimetres lands on the voxels whose centres are inside it, whatever the grid's
    orientation, spacing and origin: the reference grid is LPS, 2 x 3 x 4 mm, off the origin."""
    shape, spacing = (20, 16, 12), (2.0, 3.0, 4.0)
    affine = centered_affine(shape, spacing, "LPS")
    affine[:3, 3] += [30.0, -12.0, 7.0]
    reference = tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), reference)
    voxel = np.array([5, 6, 7])
    world = (affine @ np.r_[voxel, 1.0])[:3]
    path = write(tmp_path / "layout.json", {"space": "mm", "reference": "reference.nii.gz", "boxes": [
        {"class": "lesion", "center": world.tolist(), "size": [2.1, 3.1, 4.1]},  # just one voxel each way
        {"class": "brain", "center": world.tolist(), "size": [10.0, 15.0, 20.0]}]})
    layout = lay.read_layout(path, CLASSES)
    grid_shape, grid_affine = lay.output_grid(layout, (64, 64, 64), (3.0, 3.0, 3.0))
    assert grid_shape == shape and np.allclose(grid_affine, affine)
    single = lay.box_mask(layout.boxes[0], "mm", grid_shape, grid_affine)
    assert np.argwhere(single).tolist() == [voxel.tolist()]
    big = lay.box_mask(layout.boxes[1], "mm", grid_shape, grid_affine)
    points = np.argwhere(big)
    centres = np.c_[points, np.ones(len(points))] @ affine.T
    assert (np.abs(centres[:, :3] - world) <= np.array([5.0, 7.5, 10.0]) + 1e-6).all()
    assert len(points) == 5 * 5 * 5  # +-5 mm at 2 mm, +-7.5 mm at 3 mm, +-10 mm at 4 mm: 5 voxels along each axis
    # on the training grid (RAS, 3 mm, centred at the origin: an even side puts voxel centres at +-1.5, +-4.5 mm)
    ras_shape, ras_affine = lay.output_grid(lay.read_layout({"space": "mm", "boxes": [
        {"class": "brain", "center": [0, 0, 0], "size": [9.1, 9.1, 9.1]}]}), (16, 16, 16), (3.0, 3.0, 3.0))
    assert lay.box_mask(lay.Box("brain", (0.0, 0.0, 0.0), (9.1, 9.1, 9.1)), "mm", ras_shape, ras_affine).sum() == 4**3


def test_paint_puts_each_class_value_on_a_base_map():
    base = np.zeros((16, 16, 16), np.int16)
    base[2:14, 2:14, 2:14] = 1
    layout = lay.read_layout({"space": "voxel", "boxes": [{"class": "lesion", "center": [8, 8, 8], "size": [2, 2, 2]}]})
    painted = lay.paint(base, layout, np.eye(4), {1: "brain", 2: "ventricles", 3: "lesion"})
    assert (painted == 3).sum() == 27 and (painted == 1).sum() == (base == 1).sum() - 27
    assert base.max() == 1, "the base map is not changed"


@pytest.mark.parametrize("content, message", [
    ("{\"space\": \"mm\", \"boxes\": [", r"is not valid JSON: .* at line 1 column"),
    ({"space": "mm", "boxes": []}, r"boxes: \[\] should be non-empty|boxes: .*too short.*give at least one box"),
    ({"space": "mm", "boxes": [{"class": "lesion", "center": [0, 0, 0], "size": [4, 0, 4]}]},
     r"boxes\[0\].size\[1\]: 0 is less than or equal to the minimum of 0; sizes must be positive"),
    ({"space": "world", "boxes": [{"class": "lesion", "center": [0, 0, 0], "size": [4, 4, 4]}]},
     r"space: 'world' is not one of \['mm', 'voxel'\]"),
    ({"space": "mm", "boxes": [{"class": "lesion", "center": [0, 0], "size": [4, 4, 4]}]},
     r"boxes\[0\].center: .* give 3 values"),
    ({"space": "mm", "boxes": [{"class": "lesion", "center": [0, 0, 0], "size": [4, 4, 4], "colour": "red"}]},
     r"boxes\[0\]: Additional properties are not allowed \('colour' was unexpected\); remove the key"),
    ({"space": "mm", "boxes": [{"class": "tumour", "center": [0, 0, 0], "size": [4, 4, 4]}]},
     r"box 0 \('tumour', center \[0.0, 0.0, 0.0\] mm, size \[4.0, 4.0, 4.0\] mm\) names a class the model was "
     r"not trained on; use one of \['brain', 'ventricles', 'lesion'\]"),
    ({"space": "mm", "reference": "missing.nii.gz",
      "boxes": [{"class": "lesion", "center": [0, 0, 0], "size": [4, 4, 4]}]}, r"reference 'missing.nii.gz' not found"),
])
def test_bad_layouts_are_refused_with_one_line(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        lay.read_layout(path, CLASSES)
    assert "bad.json" in str(info.value) and "\n" not in str(info.value)


def test_a_box_outside_the_volume_is_refused_naming_it():
    layout = lay.read_layout({"space": "mm", "boxes": [
        {"class": "lesion", "center": [0, 0, 0], "size": [6, 6, 6]},
        {"class": "lesion", "center": [500, 0, 0], "size": [6, 6, 6]}]})
    shape, affine = lay.output_grid(layout, (16, 16, 16), (3.0, 3.0, 3.0))
    outside = (r"box 1 \('lesion', center \[500.0, 0.0, 0.0\] mm.*covers no voxel of the output grid "
               r"\(\[16, 16, 16\] voxels, field of view \[48.0, 48.0, 48.0\] mm\)")
    with pytest.raises(ValueError, match=outside):
        lay.rasterise(layout, shape, affine)
    with pytest.raises(FileNotFoundError, match="layout file 'nowhere.json' not found"):
        lay.read_layout("nowhere.json")
