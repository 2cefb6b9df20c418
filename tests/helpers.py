"""Shared test helpers: run bundle workflows the way users do, on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.forked_python import run_python

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_NAME = "meta_schema_20240725.json"
#: the shared definitions, merged first by every workflow: ``[COMMON, <workflow config>, <overlays>]``
COMMON = "configs/common.json"

# 32^3 demo volumes, a tiny autoencoder: a stage-1 epoch takes about a second on 2 CPU cores
TINY = {
    "demo_num_subjects": 10,
    "demo_num_validation": 2,
    "demo_num_test": 2,
    "demo_size": 32,
    "volume_size": [32, 32, 32],
    "train_patch_size": [16, 16, 16],
    "infer_patch_size": [32, 32, 32],
    "autoencoder_channels": [8, 8, 8],
    "autoencoder_norm_num_groups": 4,
    "discriminator_channels": 8,
    "discriminator_num_layers": 2,
    "num_workers": 0,
}

TRAIN_ONLY = ("train_patch_size",)
GENERATION_ONLY_LACKS = ("train_patch_size", "num_workers")
TINY_DIFFUSION = {"diffusion_channels": [8, 16, 16], "diffusion_norm_num_groups": 4,
                  "diffusion_num_head_channels": [0, 0, 8]}

# two-level networks for unit tests on 16^3 images (latents 2 x 8^3): config overrides of autoencoder_def/network_def
TWO_LEVEL_AUTOENCODER = {"autoencoder_channels": [4, 4], "latent_channels": 2, "autoencoder_norm_num_groups": 2,
                         "autoencoder_def#attention_levels": [False, False]}
TWO_LEVEL_UNET = {"latent_channels": 2, "diffusion_channels": [8, 8], "diffusion_attention_levels": [False, False],
                  "diffusion_num_head_channels": 8, "diffusion_norm_num_groups": 4}


def config_network(net_id: str, overrides: Mapping[str, Any] | None = None,
                   configs: Sequence[str] = ("configs/common.json",), seed: int | None = None) -> Any:
    """A new ``net_id`` (``autoencoder_def``, ``network_def``, ``discriminator_def``) as the bundle's configs define it,
    so that a test builds the very network the workflows build.

    Args:
        net_id: the config id of the network definition.
        overrides: top-level ids or ``#`` paths, e.g. :data:`TINY` or ``{"autoencoder_def#attention_levels": [...]}``.
        configs: config files, relative to the bundle root, merged left to right (``configs/vqvae.json`` after
            ``configs/common.json`` for the VQ-VAE).
        seed: ``torch.manual_seed`` just before the network is built, for reproducible initial weights.
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / c) for c in configs]))
    parser.update(dict(overrides or {}))
    if seed is not None:
        torch.manual_seed(seed)
    return parser.get_parsed_content(net_id)


def overrides_for(tmp: Path, infer: bool = False, generate: bool = False, stage2: bool = False, **extra) -> dict:
    """Tiny settings with every output under ``tmp`` (data, checkpoints, outputs, latent cache).

    ``infer``: for reconstruction (no training keys); ``generate``: for generation (no data-loading keys either);
    ``stage2``: for diffusion training (no stage-1 patch size, a latent cache folder under ``tmp``).
    """
    data = str(tmp / "data")
    drop = GENERATION_ONLY_LACKS if generate else TRAIN_ONLY if (infer or stage2) else ()
    if stage2:
        extra = {"latent_cache_dir": str(tmp / "cache"), **extra}
    tiny = {k: v for k, v in {**TINY, **TINY_DIFFUSION}.items() if k not in drop}
    return {**tiny, "dataset_dir": data, "demo_data_dir": data, "ckpt_dir": str(tmp / "models"),
            "output_dir": str(tmp / "outputs"), **extra}


def copied(overrides: Mapping[str, Any], dest: Path, keys: Sequence[str] = ("ckpt_dir", "output_dir")) -> dict:
    """``overrides`` of a shared fixture with the folders under ``keys`` (checkpoints and outputs) copied into
    ``dest``: a test that trains further or writes outputs works on the copies, so the fixture's other tests see
    what the fixture made whatever order they run in. Data and latent cache stay shared (read only)."""
    import shutil

    moved = dict(overrides)
    for key in keys:
        moved[key] = str(dest / Path(overrides[key]).name)
        shutil.copytree(overrides[key], moved[key])
    return moved


def torchrun(nproc: int = 2) -> list[str]:
    """The ``torchrun`` launcher (as ``python -m torch.distributed.run``) for ``nproc`` CPU processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_bundle(config_files: str | list[str], overrides: dict, check: bool = True, timeout: int = 600,
               subcommand: str = "run", launcher: list[str] | None = None,
               cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file "['configs/common.json','configs/<workflow>.json',...]" --key value``
    from the bundle root (or ``cwd``), as the README writes it.

    Args:
        config_files: one file, or files merged left to right: :data:`COMMON` first, then the workflow config, then
            overlays (a workflow without common.json stops with one line naming the fix).
        overrides: ``--key value`` pairs; values other than strings are passed as JSON.
        check: raise, with the output's end, when the command fails.
        timeout: seconds before the command is killed.
        subcommand: the ``monai.bundle`` command (``run``, ``ckpt_export``...).
        launcher: e.g. :func:`torchrun`, instead of ``python``.
        cwd: the working folder (the bundle root by default, where the config paths resolve).
    """
    files = config_files if isinstance(config_files, str) else json.dumps(config_files).replace('"', "'")
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", subcommand, "--config_file", files]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return run_command(cmd, cwd, launcher is not None, check, timeout)


def run_command(cmd: list[str], cwd: str | Path, launched: bool = False, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``cmd`` (``[python, *args]``, or a launcher's command line when ``launched``) from ``cwd``, captured; a plain
    Python command is forked from a pre-imported server (:mod:`tests.forked_python`), a launcher gets a real process.
    With ``check``, a failure raises with the end of its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if launched:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    else:
        proc = run_python(cmd[1:], cwd=cwd, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc



def metadata_schema(roots: Sequence[Path] | None = None) -> Path:
    """The offline copy of MONAI's bundle metadata schema, ``shared/schema/meta_schema_20240725.json`` in the folder
    that holds the checkout (CI clones the repository with ``shared/`` beside it; a worktree or a symlinked checkout
    finds it beside itself too). Skips the calling test when it is missing, except under CI (``CI=true``), where it
    fails.

    Args:
        roots: folders to look in for ``shared/``; default: the parent of the checkout, as reached and as resolved.
    """
    if roots is None:
        roots = list(dict.fromkeys([Path(__file__).absolute().parents[2], ROOT.parent]))
    candidates = [Path(r) / "shared" / "schema" / SCHEMA_NAME for r in roots]
    for path in candidates:
        if path.is_file():
            return path
    message = f"offline metadata schema not found (looked for {', '.join(map(str, candidates))})"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{message}; CI must clone the repository with shared/ beside it.")
    pytest.skip(message)


def fake_brats(root: Path, n: int = 5) -> Path:
    """A Medical Segmentation Decathlon ``Task01_BrainTumour`` folder under ``root`` with ``n`` random 4-channel
    8^3 volumes (1.1 mm), in the layout ``configs/brats.json`` reads."""
    import nibabel as nib
    import numpy as np

    task = root / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    for i in range(n):
        img = nib.Nifti1Image(np.random.rand(8, 8, 8, 4).astype(np.float32), np.diag([1.1, 1.1, 1.1, 1]))
        lab = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.diag([1.1, 1.1, 1.1, 1]))
        nib.save(img, task / "imagesTr" / f"BRATS_{i:03d}.nii.gz")
        nib.save(lab, task / "labelsTr" / f"BRATS_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "description": "fake", "reference": "", "licence": "", "release": "", "tensorImageSize": "4D",
        "training": training, "test": [], "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background"}, "numTraining": n, "numTest": 0}))
    return task
