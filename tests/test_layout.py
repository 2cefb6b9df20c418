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


# ---- layout attention (LayoutDiffuse in 3D) ------------------------------------------------------------------------

def tiny_unet_and_blocks(seed=0):
    import torch

    from scripts.layout_attention import LayoutAttention
    from tests.helpers import TINY_DIFFUSION, config_network

    unet = config_network("network_def", {"latent_channels": 4, **TINY_DIFFUSION}, seed=seed).eval()
    with torch.no_grad():  # MONAI zero-initialises the UNet's output layer: give it the non-zero output of training
        for p in unet.out.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    return unet, LayoutAttention([8, 16, 16], [0, 1, 2], ["lesion", "ventricles"], embedding_dim=8).eval()


def voxel_layout(*boxes):
    return lay.read_layout({"space": "voxel", "boxes": [
        {"class": c, "center": list(centre), "size": list(size)} for c, centre, size in boxes]})


def test_layout_blocks_start_as_a_no_op():
    """Zero-initialised output projections: before training, sampling through the layout blocks (with or without
    layout guidance) gives exactly the base model's samples for the same noise; trained blocks change them."""
    import torch
    from monai.networks.schedulers import DDIMScheduler

    from scripts.layout_attention import encode_layout, layout_denoiser
    from scripts.sampling import LatentDiffusionPipeline, reverse_process

    unet, blocks = tiny_unet_and_blocks()
    pipeline = LatentDiffusionPipeline(unet, DDIMScheduler(num_train_timesteps=50), None, 1.0, 3)
    instances, names = lay.rasterise(voxel_layout(("lesion", (10, 10, 10), (6, 6, 6)),
                                                  ("ventricles", (20, 16, 16), (8, 4, 4))), (32, 32, 32), np.eye(4))
    layout = encode_layout(instances, names, blocks.classes)
    noise = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipeline.sample(noise, progress=False)
    for scale in (1.0, 3.0):
        got = reverse_process(layout_denoiser(pipeline, blocks, layout, scale), pipeline.scheduler, noise, 3,
                              progress=False)
        assert float((got - expected).abs().max()) < 1e-6
    with torch.no_grad():
        for block in blocks.blocks.values():
            block.out.weight.normal_(0.0, 0.1)
    got = reverse_process(layout_denoiser(pipeline, blocks, layout, 1.0), pipeline.scheduler, noise, 3, progress=False)
    assert float((got - expected).abs().max()) > 1e-4
    assert not unet.up_blocks[0]._forward_pre_hooks, "the hooks are removed after each call"


def test_layout_attention_is_restricted_to_each_box():
    """A token in box A (or in the background) is unaffected by changing the features inside box B; the class
    embedding reaches the tokens of its box."""
    import torch

    from scripts.layout_attention import LayoutAttentionBlock, encode_layout, token_regions

    torch.manual_seed(0)
    block = LayoutAttentionBlock(8, 4, num_heads=2)
    with torch.no_grad():
        block.out.weight.normal_(0.0, 0.5)
    instances, names = lay.rasterise(voxel_layout(("lesion", (2, 2, 2), (3, 3, 3)), ("lesion", (6, 6, 6), (3, 3, 3))),
                                     (8, 8, 8), np.eye(4))
    regions, token_classes = token_regions(encode_layout(instances, names, ["lesion"]), (8, 8, 8))
    assert set(regions.unique().tolist()) == {0, 1, 2} and set(token_classes.unique().tolist()) == {0, 1}
    embeddings = torch.randn(2, 4)[token_classes]
    x = torch.randn(1, 8, 8, 8, 8)
    changed = x.clone()
    in_b = torch.as_tensor(instances == 2)
    changed[0][:, in_b] += torch.randn(8, int(in_b.sum()))
    out, out_changed = block(x, regions, embeddings), block(changed, regions, embeddings)
    not_b = ~in_b
    torch.testing.assert_close(out[0][:, not_b], out_changed[0][:, not_b], atol=1e-6, rtol=0)
    assert float((out[0][:, in_b] - out_changed[0][:, in_b]).abs().max()) > 1e-3
    other = embeddings.clone()
    other[regions == 1] += 1.0  # box A's class embedding changed: box A's tokens change, the rest do not
    out_other = block(x, regions, other)
    in_a = torch.as_tensor(instances == 1)
    assert float((out[0][:, in_a] - out_other[0][:, in_a]).abs().max()) > 1e-3
    torch.testing.assert_close(out[0][:, ~in_a], out_other[0][:, ~in_a], atol=1e-6, rtol=0)


def test_boxes_are_pooled_onto_each_level_grid():
    import torch

    from scripts.layout_attention import encode_layout, token_regions

    instances, names = lay.rasterise(voxel_layout(("lesion", (10, 10, 10), (6, 6, 6))), (32, 32, 32), np.eye(4))
    layout = encode_layout(instances, names, ["lesion"])
    for grid, tokens in (((8, 8, 8), 27), ((4, 4, 4), 8), ((2, 2, 2), 1)):
        regions, classes = token_regions(layout, grid)
        assert int((regions == 1).sum()) == tokens and torch.equal(regions, classes)
    tiny = lay.rasterise(voxel_layout(("lesion", (5, 5, 5), (1, 1, 1))), (32, 32, 32), np.eye(4))[0]
    assert int((token_regions(encode_layout(tiny, names, ["lesion"]), (4, 4, 4))[0] == 1).sum()) == 1, \
        "a box smaller than a token still owns the token it lies in (max pooling)"


def test_unknown_layout_classes_are_refused_with_one_line():
    from scripts.layout_attention import LayoutAttention, LayoutPrepareBatch, encode_layout

    with pytest.raises(ValueError, match=r"names classes \['tumour'\] that the layout blocks were not trained on; "
                                         r"use one of \['lesion'\]"):
        encode_layout(np.ones((4, 4, 4), int), {1: "tumour"}, ["lesion"], "a.json")
    with pytest.raises(ValueError, match="layout_levels \\[3\\] must be non-empty levels of the UNet, 0 to 2"):
        LayoutAttention([8, 16, 16], [3], ["lesion"])
    from monai.networks.schedulers import DDPMScheduler

    with pytest.raises(ValueError, match=r"layout_classes \['tumour'\] must name classes of label_classes"):
        LayoutPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, {"1": "brain", "3": "lesion"}, ["tumour"])


def test_training_layouts_are_the_label_maps_components_and_drop_to_empty():
    import torch
    from monai.networks.schedulers import DDPMScheduler

    from scripts.layout_attention import LayoutPrepareBatch, component_layout

    label = torch.zeros(2, 1, 16, 16, 16)
    label[0, 0, 2:12, 2:12, 2:12] = 1
    label[0, 0, 3:5, 3:5, 3:6] = 3
    label[0, 0, 9:11, 8:11, 9:10] = 3
    instances, classes = component_layout(label, [3])
    assert classes.tolist() == [[1, 1], [0, 0]]
    assert int((instances[0] == 1).sum()) == 12 and int((instances[0] == 2).sum()) == 6 and not instances[1].any()
    batch = {"z_mu": torch.zeros(2, 4, 4, 4, 4), "z_sigma": torch.zeros(2, 4, 4, 4, 4), "label": label}
    for p, kept in ((0.0, 2), (1.0, 0)):
        prepare = LayoutPrepareBatch(DDPMScheduler(num_train_timesteps=10), 1.0, {"1": "brain", "3": "lesion"},
                                     ["lesion"], layout_drop_prob=p)
        _, _, _, kwargs = prepare(batch, generator=torch.Generator().manual_seed(0))
        inst, cls = kwargs["layout"]
        assert int((cls > 0).sum()) == kept and (int(inst.max()) > 0) == bool(kept)


@pytest.fixture(scope="module")
def trained_layout(tmp_path_factory):
    """Tiny stage 1, stage 2 and layout blocks on the demo data (lesions of the label maps as the boxes)."""
    from scripts.storage import file_sha256
    from tests.helpers import COMMON, overrides_for, run_bundle

    tmp = tmp_path_factory.mktemp("layout")
    run_bundle([COMMON, "configs/train_autoencoder.json"], overrides_for(tmp, max_epochs=1, val_interval=5, lr=1e-3))
    stage2 = overrides_for(tmp, stage2=True, max_epochs=1, val_interval=5, train_batch_size=2, val_batch_size=2,
                           preview_num_samples=1, preview_steps=2, lr_warmup_iterations=2)
    run_bundle([COMMON, "configs/train_diffusion.json"], stage2)
    unet_files = {n: file_sha256(tmp / "models" / n) for n in ("model.pt", "model_ema.pt", "model_record.json")}
    proc = run_bundle([COMMON, "configs/train_diffusion.json", "configs/train_layout.json"],
                      {**stage2, "max_epochs": 2, "val_interval": 1, "base_learning_rate": 1e-3,
                       "layout_drop_prob": 0.2})
    return tmp, unet_files, proc


def test_layout_training_moves_only_the_new_blocks(trained_layout):
    import torch

    from scripts.storage import file_sha256

    tmp, unet_files, _ = trained_layout
    models = tmp / "models"
    for name in ("model_layout.pt", "model_layout_ema.pt", "model_layout_best.pt", "checkpoint_layout.pt",
                 "model_layout_record.json"):
        assert (models / name).is_file(), name
    assert {n: file_sha256(models / n) for n in unet_files} == unet_files, "the UNet's files are untouched"
    record = json.loads((models / "model_layout_record.json").read_text())
    assert record["layout_classes"] == ["lesion"] and record["layout_levels"] == [0, 1]
    assert record["diffusion_sha256"] == unet_files["model_ema.pt"] and record["layout_drop_prob"] == 0.2
    state = torch.load(models / "model_layout.pt", weights_only=True)
    assert not any(k.startswith(("down_blocks", "up_blocks", "middle_block")) for k in state), "blocks only"
    moved = [k for k in state if k.endswith("out.weight") and float(state[k].abs().max()) > 0]
    assert moved, "training moved the zero-initialised output projections"
    checkpoint = torch.load(models / "checkpoint_layout.pt", weights_only=True)
    assert {"layout", "ema", "optimizer", "record"} <= set(checkpoint)


def test_layouts_generate_through_the_blocks_with_pairs_on_one_grid(trained_layout, tmp_path):
    """configs/inference_layout.json without --paste_onto: each sample's image and instance label map share shape and
    affine (the layout's reference grid), the side file maps ids to classes, the manifest holds the box check; a
    class the blocks were not trained on is refused with one line."""
    from scripts.nifti import save_nifti
    from tests.helpers import COMMON, overrides_for, run_bundle

    tmp, _, _ = trained_layout
    reference = save_nifti(np.zeros((32, 32, 32), np.float32), centered_affine((32, 32, 32), (3.0, 3.0, 3.0)),
                           tmp_path / "reference.nii.gz")
    layout = write(tmp_path / "layout.json", {"space": "mm", "reference": str(reference), "boxes": [
        {"class": "lesion", "center": [0.0, 10.0, 5.0], "size": [9.0, 9.0, 9.0], "shape": "ellipsoid"},
        {"class": "lesion", "center": [-20.0, -10.0, 0.0], "size": [6.0, 6.0, 6.0]}]})
    files = [COMMON, "configs/inference.json", "configs/inference_layout.json"]
    ov = overrides_for(tmp, generate=True, num_inference_steps=2, layouts=[layout], samples_per_layout=2,
                       layout_guidance_scale=2.0)
    proc = run_bundle(files, ov)
    run = max((tmp / "outputs").glob("layout_*"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["samples"]) == 2 and manifest["network_calls_per_step"] == 2
    for sample in manifest["samples"]:
        image, label = nib.load(run / sample["image"]), nib.load(run / sample["label"])
        assert image.shape == label.shape == (32, 32, 32)
        np.testing.assert_allclose(image.affine, label.affine, atol=1e-6)
        np.testing.assert_allclose(image.affine, nib.load(reference).affine, atol=1e-5)
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}
        assert [b["class"] for b in sample["box_check"]["boxes"]] == ["lesion", "lesion"]
    assert json.loads((run / "layout_0000_instances.json").read_text())["instances"] == {"1": "lesion", "2": "lesion"}
    assert (run / "samples.png").is_file() and "box recall" in proc.stdout
    assert set(manifest["box_check_summary"]) == {"box_recall", "mean_iou", "samples_with_lesions_outside_boxes"}
    bad = write(tmp_path / "bad.json", {"space": "mm", "boxes": [
        {"class": "ventricles", "center": [0.0, 0.0, 0.0], "size": [9.0, 9.0, 9.0]}]})
    proc = run_bundle(files, {**ov, "layouts": [bad]}, check=False)
    assert proc.returncode != 0
    assert "names a class the model was not trained on; use one of ['lesion']" in proc.stdout + proc.stderr
