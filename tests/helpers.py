"""Shared test helpers: run bundle workflows the way users do, on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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
TINY_DIFFUSION = {"diffusion_channels": [8, 16, 16], "diffusion_norm_num_groups": 4, "diffusion_num_head_channels": [0, 0, 8]}


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


def torchrun(nproc: int = 2) -> list[str]:
    """The ``torchrun`` launcher (as ``python -m torch.distributed.run``) for ``nproc`` CPU processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_bundle(config_files: str | list[str], overrides: dict, check: bool = True, timeout: int = 600,
               subcommand: str = "run", launcher: list[str] | None = None,
               cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file ... --key value`` from the bundle root (or ``cwd``);
    ``launcher``: e.g. :func:`torchrun`, instead of ``python``."""
    files = config_files if isinstance(config_files, str) else json.dumps(config_files).replace('"', "'")
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", subcommand, "--config_file", files]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc

