"""Model Zoo packaging: the zip's layout, version refusal, and the unzipped bundle running from another folder."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import pytest
from monai.bundle import ConfigParser

from scripts.package import INCLUDED, PackageError, bundle_name, package
from tests.forked_python import run_python
from tests.helpers import COMMON, ROOT, TINY, TINY_DIFFUSION, run_bundle

METADATA = json.loads((ROOT / "configs" / "metadata.json").read_text())
NAME, VERSION = bundle_name(METADATA), METADATA["version"]


def _package_cli(*args):
    return run_python(["-m", "scripts.package", *args], cwd=ROOT)


def _last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_package_layout_and_unzipped_bundle_runs_elsewhere(tmp_path):
    proc = _package_cli("--output_dir", str(tmp_path / "dist"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    zip_path = tmp_path / "dist" / f"{NAME}_v{VERSION}.zip"
    assert str(zip_path) in proc.stdout
    names = zipfile.ZipFile(zip_path).namelist()
    assert all(n.startswith(f"{NAME}/") for n in names)
    inside = {n[len(NAME) + 1:] for n in names}
    assert {"configs/common.json", "configs/metadata.json", "configs/inference.json", "scripts/__init__.py",
            "docs/README.md", "LICENSE", "README.md", "large_files.yml", "models/"} <= inside
    assert not [n for n in inside if n.startswith(("tests/", "outputs/", "cache/", "data/", "logs/", "dist/"))
                or "__pycache__" in n or n.endswith(".pyc") or (n.startswith("models/") and n != "models/")]
    record = json.loads((tmp_path / "dist" / "packaged.json").read_text())
    assert record[VERSION]["zip"] == zip_path.name and record[VERSION]["weights"] == []

    again = _package_cli("--output_dir", str(tmp_path / "dist"))
    assert again.returncode == 1 and _last_line(again).startswith(f"ERROR: version {VERSION} is already packaged")

    # unzip somewhere else and run from there, the way a Model Zoo user does: cd into the bundle, --bundle_root
    zipfile.ZipFile(zip_path).extractall(tmp_path / "elsewhere")
    bundle = tmp_path / "elsewhere" / NAME
    ov = {**TINY, "bundle_root": str(bundle)}
    run_bundle([COMMON, "configs/train_autoencoder.json"], {**ov, "max_epochs": 1, "val_interval": 5}, cwd=bundle)
    infer = {k: v for k, v in ov.items() if k != "train_patch_size"}
    run_bundle([COMMON, "configs/inference_autoencoder.json"], infer, cwd=bundle)
    assert (bundle / "models" / "model_autoencoder.pt").is_file()
    assert (bundle / "data" / "demo" / "datalist.json").is_file()
    summary = json.loads(next((bundle / "outputs").glob("reconstruction_*/summary.json")).read_text())
    assert summary["num_volumes"] == 2

    # the other workflows, from the same folder: stage 2, generation, evaluation
    diffusion = {**infer, **TINY_DIFFUSION}
    run_bundle([COMMON, "configs/train_diffusion.json"],
               {**diffusion, "max_epochs": 1, "val_interval": 5}, cwd=bundle)
    assert (bundle / "models" / "model.pt").is_file() and any((bundle / "cache").iterdir())
    generate = {k: v for k, v in diffusion.items() if k != "num_workers"}
    run_bundle([COMMON, "configs/inference.json"], {**generate, "num_samples": 2, "num_inference_steps": 2}, cwd=bundle)
    generated = next((bundle / "outputs").glob("generated_*"))
    assert len(list(generated.glob("*.nii.gz"))) == 2
    run_bundle([COMMON, "configs/evaluate.json"], {**generate, "max_pairs": 2}, cwd=bundle)
    assert (next((bundle / "outputs").glob("evaluation_*")) / "metrics.json").is_file()


def _copy_bundle(dest):
    """A copy of the shipped files with an empty models/, so tests never touch this checkout's weights."""
    for name in INCLUDED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "models").mkdir()
    return dest


def test_package_refuses_an_old_version_and_missing_weights(tmp_path):
    (tmp_path / "packaged.json").write_text(json.dumps({"99.0.0": {"zip": "x.zip"}}))
    with pytest.raises(PackageError, match=f"version {VERSION} is not newer than version 99.0.0"):
        package(output_dir=str(tmp_path))
    with pytest.raises(PackageError, match="no trained weights"):
        package(output_dir=str(tmp_path / "other"), weights=True, bundle_root=str(_copy_bundle(tmp_path / "copy")))
    assert not list(tmp_path.rglob("*.zip"))


def test_weights_and_large_files_entries(tmp_path):
    """--weights ships the trained files; --weights_url lists them in large_files.yml with their real md5."""
    root = _copy_bundle(tmp_path / "copy")
    (root / "models" / "model_autoencoder.pt").write_bytes(b"autoencoder weights")
    zip_path = package(output_dir=str(tmp_path / "dist"), weights=True, weights_url="https://example.org/v1/",
                       bundle_root=str(root))
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read(f"{NAME}/models/model_autoencoder.pt") == b"autoencoder weights"
        (tmp_path / "large_files.yml").write_bytes(zf.read(f"{NAME}/large_files.yml"))
    entries = ConfigParser.load_config_file(str(tmp_path / "large_files.yml"))["large_files"]
    assert entries == [{"path": "models/model_autoencoder.pt", "url": "https://example.org/v1/model_autoencoder.pt",
                        "hash_val": hashlib.md5(b"autoencoder weights").hexdigest(), "hash_type": "md5"}]
