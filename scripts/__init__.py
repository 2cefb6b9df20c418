"""Python side of the 3D latent diffusion bundle: configs in ``configs/`` wire these modules.

Modules by role: ``demo_data`` and ``data`` (datalists, demo volumes, batch preparation), ``autoencoders`` (one
interface for the KL and VQ stage-1 networks: posterior, decoding, downsampling factor, size checks), ``networks``
(single-tensor inference and export wrappers), ``weights`` (weight loading, monai-generative conversion),
``losses``, ``engines`` (trainers), ``handlers`` (checkpoints, previews, progress, codebook usage), ``schedulers``
(noise schedulers by name, sampling steps), ``diffusion`` (the stage-2 objective), ``conditioning`` and ``text``
(declared conditions, their encoder and null tokens, prompts), ``sampling`` (the sampling loop and pipeline,
per-condition guidance), ``records`` (the stage-2 training record), ``provenance`` (merged config, versions and
hashes beside every run), ``generation``, ``controlnet`` and ``synthesis`` (label-map control: vocabulary,
objective, image + label pairs), ``layout`` (3D box layouts: validation, rasterisation in mm or voxels),
``reconstruction`` (stage-1 inference), ``distributed`` (torchrun/DDP), ``launch`` (the LDM-style ``main.py``),
``package`` (Model Zoo zip), ``evaluation`` (generation quality), ``checks`` (config validation, typed command-line
values), ``nifti`` (NIfTI writing and affines), ``storage`` (atomic writes), ``visualize`` (PNG figures), ``errors``.

Submodules load on first use (``scripts.data.load_datalist`` in a config imports ``scripts.data``), so that
``python -m scripts.demo_data`` stays light.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from scripts.errors import install_error_summary

__all__ = [
    "autoencoders", "checks", "conditioning", "controlnet", "data", "demo", "demo_data", "diffusion", "distributed",
    "engines", "errors", "evaluation", "generation", "handlers", "latents", "launch", "layout", "losses", "networks",
    "nifti", "package", "provenance", "reconstruction", "records", "sampling", "schedulers", "serving", "storage",
    "synthesis", "text", "visualize", "weights",
]

#: the bundle folder (the one holding ``configs/`` and this package): the default ``bundle_root`` of every workflow,
#: so that the configs resolve the same from any working folder
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"scripts.{name}")
    raise AttributeError(f"module 'scripts' has no attribute '{name}'")


install_error_summary()
