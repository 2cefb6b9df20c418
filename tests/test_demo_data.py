"""Tests for the synthetic head-phantom generator ``scripts/demo_data.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # allow plain `pytest` as well as `python -m pytest` from the repo root
    sys.path.insert(0, str(REPO_ROOT))

from scripts.demo_data import (  # noqa: E402 (after the sys.path fallback above)
    GENERATOR_VERSION,
    ensure_demo_data,
    make_demo_dataset,
    make_subject,
)
from scripts.nifti import centered_affine  # noqa: E402

SIZE = 32
SPACING = 3.0
SETTINGS = {"num_subjects": 5, "size": SIZE, "spacing": SPACING, "seed": 3, "num_validation": 1, "num_test": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    path = make_demo_dataset(str(out), **SETTINGS)
    with open(path) as f:
        return out, json.load(f)


def _entries(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"] + datalist["test"]


def _expected_affine(size: int = SIZE, spacing: float = SPACING) -> np.ndarray:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2.0 * spacing
    return affine


def test_make_subject_shapes_dtypes_and_labels() -> None:
    image, label, params = make_subject(np.random.default_rng([0, 0]), size=SIZE, spacing=SPACING)
    assert image.shape == label.shape == (SIZE,) * 3
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert np.isfinite(image).all() and image.min() >= 0
    assert 0.9 < image.max() < 1.2
    # background (corners) is dark, the head is not
    assert image[:3, :3, :3].mean() < 0.1
    assert image[label == 1].mean() > 0.3
    values = set(np.unique(label).tolist())
    assert values <= {0, 1, 2, 3}
    assert {1, 2} <= values
    assert params["lesion_count"] in range(4)
    json.dumps(params)  # JSON-serialisable


@pytest.mark.parametrize("i", range(6))
def test_lesion_bookkeeping(i: int) -> None:
    _, label, params = make_subject(np.random.default_rng([1, i]), size=SIZE, spacing=SPACING)
    n = params["lesion_count"]
    assert len(params["lesion_volumes_ml"]) == len(params["lesion_centers_vox"]) == len(params["lesion_contrast"]) == n
    voxel_ml = SPACING**3 / 1000
    assert sum(params["lesion_volumes_ml"]) == pytest.approx(np.count_nonzero(label == 3) * voxel_ml, abs=1e-6)
    if n == 0:
        assert not (label == 3).any()
    for center in params["lesion_centers_vox"]:
        assert label[tuple(center)] == 3


def test_some_subjects_have_lesions() -> None:
    counts = [make_subject(np.random.default_rng([0, i]), size=SIZE)[2]["lesion_count"] for i in range(8)]
    assert max(counts) > 0


@pytest.mark.parametrize("i", range(4))
def test_ventricles_left_right_symmetric(i: int) -> None:
    size = 64  # 32^3 ventricles are only a few voxels wide; 64^3 still takes well under a second
    _, label, _ = make_subject(np.random.default_rng([0, i]), size=size, spacing=SPACING)
    vent = label == 2
    left, right = np.count_nonzero(vent[: size // 2]), np.count_nonzero(vent[size // 2 :])
    assert left > 0 and right > 0
    assert abs(left - right) <= 0.3 * max(left, right)


def test_make_subject_deterministic() -> None:
    a = make_subject(np.random.default_rng([5, 2]), size=SIZE)
    b = make_subject(np.random.default_rng([5, 2]), size=SIZE)
    c = make_subject(np.random.default_rng([6, 2]), size=SIZE)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_files_affine_and_spacing(dataset: tuple[Path, dict]) -> None:
    out, datalist = dataset
    entry = datalist["training"][0]
    expected = _expected_affine()
    np.testing.assert_allclose(centered_affine((SIZE,) * 3, (SPACING,) * 3), expected)  # the demo's affine
    for key, dtype in (("image", np.float32), ("label", np.uint8)):
        img = nib.load(out / entry[key])
        assert img.shape == (SIZE,) * 3
        assert img.get_data_dtype() == dtype
        np.testing.assert_allclose(img.affine, expected)
        np.testing.assert_allclose(img.header.get_zooms(), (SPACING,) * 3)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    arr = np.asarray(nib.load(out / entry["label"]).dataobj)
    assert arr.dtype == np.uint8


def test_monai_loading_keeps_geometry(dataset: tuple[Path, dict]) -> None:
    from monai.transforms import LoadImage, LoadImaged, Orientationd

    out, datalist = dataset
    entry = datalist["training"][0]
    img = LoadImage(image_only=True)(str(out / entry["image"]))
    assert tuple(img.shape) == (SIZE,) * 3
    np.testing.assert_allclose(np.asarray(img.affine), _expected_affine(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.meta["pixdim"])[1:4], (SPACING,) * 3)

    files = {"image": str(out / entry["image"]), "label": str(out / entry["label"])}
    loaded = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(files)
    oriented = Orientationd(keys=["image", "label"], axcodes="RAS")(dict(loaded))
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.asarray(oriented[key]), np.asarray(loaded[key]))
    raw = np.asarray(nib.load(out / entry["image"]).dataobj)
    np.testing.assert_allclose(np.asarray(oriented["image"])[0], raw)


def test_datalist_structure_and_splits(dataset: tuple[Path, dict]) -> None:
    from monai.data import load_decathlon_datalist

    out, datalist = dataset
    for key in ("name", "description", "labels", "tensorImageSize", "generator", "training", "validation", "test"):
        assert key in datalist
    assert datalist["labels"] == {"0": "background", "1": "brain", "2": "ventricles", "3": "lesion"}
    assert datalist["tensorImageSize"] == "3D"
    assert datalist["generator"] == {**SETTINGS, "version": GENERATOR_VERSION}
    assert [e["subject"] for e in datalist["training"]] == ["demo_000", "demo_001", "demo_002"]
    assert [e["subject"] for e in datalist["validation"]] == ["demo_003"]
    assert [e["subject"] for e in datalist["test"]] == ["demo_004"]
    entry = datalist["training"][0]
    assert entry["image"] == "imagesTr/demo_000.nii.gz" and entry["label"] == "labelsTr/demo_000.nii.gz"
    for key in (
        "head_radii_mm",
        "head_volume_ml",
        "brain_volume_ml",
        "ventricle_volume_ml",
        "lesion_count",
        "lesion_volumes_ml",
        "lesion_centers_vox",
        "lesion_contrast",
        "tissue_intensities",
        "rotation_deg",
        "noise_sigma",
    ):
        assert key in entry["params"], key
    assert len(entry["params"]["head_radii_mm"]) == 3
    datalist_path = out / "datalist.json"
    for split, n in (("training", 3), ("validation", 1), ("test", 1)):
        items = load_decathlon_datalist(str(datalist_path), data_list_key=split, base_dir=str(out))
        assert len(items) == n
        for item in items:
            for key in ("image", "label"):
                assert os.path.isabs(item[key]) and os.path.isfile(item[key])
    # no temporary files left behind by the atomic writes
    leftovers = [p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []


def test_recorded_volumes_match_label_files(dataset: tuple[Path, dict]) -> None:
    out, datalist = dataset
    voxel_ml = SPACING**3 / 1000
    for entry in _entries(datalist):
        label = np.asarray(nib.load(out / entry["label"]).dataobj)
        params = entry["params"]
        assert params["brain_volume_ml"] == pytest.approx(np.count_nonzero(label == 1) * voxel_ml, abs=1e-6)
        assert params["ventricle_volume_ml"] == pytest.approx(np.count_nonzero(label == 2) * voxel_ml, abs=1e-6)
        assert sum(params["lesion_volumes_ml"]) == pytest.approx(np.count_nonzero(label == 3) * voxel_ml, abs=1e-6)
        assert params["head_volume_ml"] > params["brain_volume_ml"] > params["ventricle_volume_ml"] > 0
        if params["lesion_count"] == 0:
            assert not (label == 3).any()


def test_files_match_make_subject(dataset: tuple[Path, dict]) -> None:
    out, datalist = dataset
    entry = datalist["validation"][0]
    i = int(entry["subject"].split("_")[1])
    image, label, params = make_subject(np.random.default_rng([SETTINGS["seed"], i]), size=SIZE, spacing=SPACING)
    np.testing.assert_array_equal(np.asarray(nib.load(out / entry["image"]).dataobj), image)
    np.testing.assert_array_equal(np.asarray(nib.load(out / entry["label"]).dataobj), label)
    assert entry["params"] == params


def test_subject_independent_of_num_subjects(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    small = tmp_path / "small"
    make_demo_dataset(
        str(small), num_subjects=3, size=SIZE, spacing=SPACING, seed=SETTINGS["seed"], num_validation=1, num_test=1
    )
    for i in range(3):
        for sub in ("imagesTr", "labelsTr"):
            a = np.asarray(nib.load(out / sub / f"demo_{i:03d}.nii.gz").dataobj)
            b = np.asarray(nib.load(small / sub / f"demo_{i:03d}.nii.gz").dataobj)
            np.testing.assert_array_equal(a, b)


def test_different_seed_gives_different_data(tmp_path: Path, dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    other = tmp_path / "other"
    make_demo_dataset(str(other), num_subjects=2, size=SIZE, seed=SETTINGS["seed"] + 1, num_validation=0, num_test=0)
    a = np.asarray(nib.load(out / "imagesTr" / "demo_000.nii.gz").dataobj)
    b = np.asarray(nib.load(other / "imagesTr" / "demo_000.nii.gz").dataobj)
    assert not np.array_equal(a, b)


def test_split_sizes_shrink_when_no_training_subject_is_left(tmp_path: Path) -> None:
    path = make_demo_dataset(str(tmp_path), num_subjects=2, size=SIZE, num_validation=1, num_test=1)
    with open(path) as f:
        datalist = json.load(f)
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 0]
    assert datalist["generator"]["num_validation"] == 1 and datalist["generator"]["num_test"] == 1  # as requested
    with pytest.raises(ValueError):
        make_demo_dataset(str(tmp_path), num_subjects=2, size=SIZE, num_validation=-1)
    with pytest.raises(ValueError):
        make_demo_dataset(str(tmp_path), num_subjects=0, size=SIZE)


def test_ensure_demo_data_reuses_and_regenerates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ensure"
    kwargs = {"num_subjects": 3, "size": SIZE, "spacing": SPACING, "seed": 0, "num_validation": 1, "num_test": 1}
    path = ensure_demo_data(str(out), **kwargs)
    assert "generated" in capsys.readouterr().out
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    assert ensure_demo_data(str(out), **kwargs) == path
    assert "reusing" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # changed settings -> regenerated and recorded
    ensure_demo_data(str(out), **{**kwargs, "seed": 1})
    assert "generated" in capsys.readouterr().out
    with open(path) as f:
        assert json.load(f)["generator"]["seed"] == 1

    # a missing file -> regenerated
    os.remove(out / "labelsTr" / "demo_001.nii.gz")
    ensure_demo_data(str(out), **{**kwargs, "seed": 1})
    assert "generated" in capsys.readouterr().out
    assert (out / "labelsTr" / "demo_001.nii.gz").is_file()

    # a corrupt datalist -> regenerated
    (out / "datalist.json").write_text("{not json")
    ensure_demo_data(str(out), **{**kwargs, "seed": 1})
    assert "generated" in capsys.readouterr().out


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo_data", "--help"],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PAGER": "cat"},
    )
    assert result.returncode == 0, result.stderr
    assert "output_dir" in result.stdout + result.stderr


def test_cli_generates(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.demo_data",
            "--output_dir",
            str(out),
            "--num_subjects",
            "8",
            "--size",
            "32",
        ],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with open(out / "datalist.json") as f:
        datalist = json.load(f)
    assert datalist["generator"]["size"] == 32 and len(_entries(datalist)) == 8
    # the default 4 + 4 held-out subjects would leave no training data: shrunk to 4 / 2 / 2
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [4, 2, 2]
    for entry in _entries(datalist):
        assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()
