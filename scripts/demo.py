"""The main job: the whole pipeline on the embedded demo data — stage 1, stage 2, generation.

    python -m scripts.demo                      # at most 15 minutes on 2 CPU cores: 16 generated volumes
    python -m scripts.demo --stage1_epochs 20 --stage2_epochs 20 --num_samples 4   # a quicker look

Each stage is the bundle workflow a user would run with ``python -m monai.bundle run`` (same configs, each merged
after ``configs/common.json``, same outputs); this only chains them and prints where everything is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from scripts.checks import as_bool

__all__ = ["main"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
COMMON = "configs/common.json"  # the shared definitions, merged first by every workflow


def _run(config_file: list[str], **overrides: Any) -> None:
    from monai.bundle import run

    run(config_file=config_file, meta_file="configs/metadata.json", logging_file="configs/logging.conf",
        **{k: v for k, v in overrides.items() if v is not None})


def main(stage1_epochs: int | None = None, stage2_epochs: int | None = None, num_samples: int = 16,
         sampler: str | None = None, skip_stage1: bool = False, skip_stage2: bool = False) -> None:
    """Train the autoencoder, train the latent diffusion model, generate ``num_samples`` volumes.

    Args:
        stage1_epochs: stage-1 epochs (default: ``max_epochs`` of configs/train_autoencoder.json).
        stage2_epochs: stage-2 epochs (default: ``max_epochs`` of configs/train_diffusion.json).
        num_samples: volumes to generate.
        sampler: ``rflow`` for a rectified-flow model (the default recipe), ``ddpm``, ``ddim`` or ``pndm`` for a
            DDPM-trained one; default: the fast sampler of the trained model's family (from its training record).
        skip_stage1: reuse ``models/model_autoencoder.pt``.
        skip_stage2: reuse ``models/model_ema.pt``.
    """
    os.chdir(BUNDLE_ROOT)  # the config paths, their macros and default paths are relative to the bundle root
    times = {}
    start = time.time()
    if not as_bool(skip_stage1, "skip_stage1"):
        _run([COMMON, "configs/train_autoencoder.json"], max_epochs=stage1_epochs)
        times["stage 1 (autoencoder)"] = time.time() - start
    t = time.time()
    if not as_bool(skip_stage2, "skip_stage2"):
        _run([COMMON, "configs/train_diffusion.json"], max_epochs=stage2_epochs)
        times["stage 2 (latent diffusion)"] = time.time() - t
    t = time.time()
    _run([COMMON, "configs/inference.json"], num_samples=num_samples, sampler=sampler)
    times["generation"] = time.time() - t
    outputs = BUNDLE_ROOT / "outputs"
    latest = {prefix: max(outputs.glob(f"{prefix}_*"), default=None)
              for prefix in ("train_autoencoder", "train_diffusion", "generated")}
    print("\n=== demo pipeline finished in %.1f min ===" % ((time.time() - start) / 60))
    for name, seconds in times.items():
        print(f"  {name}: {seconds / 60:.1f} min")
    print(f"  weights: {BUNDLE_ROOT / 'models'}")
    for prefix, path in latest.items():
        if path is not None:
            print(f"  {prefix}: {path}")
    if latest["generated"] is not None:
        print(f"  generated volumes: {latest['generated']}/sample_*.nii.gz; "
              f"montage: {latest['generated'] / 'samples.png'}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
