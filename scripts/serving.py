"""The bundle's inference workflows as objects for a server that feeds one volume at a time (MONAI Label's app in
``apps/monailabel``): the merged config of a workflow, built from this bundle's own files whatever the working folder,
with its ``initialize`` steps run (the checks, and the strict loading of every weight file).

A served request then runs the workflow's own pieces, by their MONAI property ids: ``preprocessing`` (the shared chain
of ``configs/common.json``), the ``network`` through the ``inferer`` (reconstruction) or
:func:`scripts.generation.sample_like` on the ``pipeline`` (generation), and ``postprocessing`` (``Invertd``: the
answer lands on the input's grid, with its affine).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

import scripts
from scripts.checks import COMMON, check_known_keys
from scripts.errors import bundle_cause

__all__ = ["SERVED_WORKFLOWS", "served_config"]

#: served task -> the workflow config merged after configs/common.json
SERVED_WORKFLOWS = {"reconstruction": "configs/inference_autoencoder.json", "generation": "configs/inference.json"}


def served_config(task: str, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The parsed config of a served task (``reconstruction`` or ``generation``), its ``initialize`` steps run.

    Args:
        task: a key of :data:`SERVED_WORKFLOWS`.
        overrides: config ids or ``#`` paths and their values, as on the command line of ``monai.bundle run``
            (e.g. ``{"bundle_root": "/models/tiny", "sampler": "ddim"}``).

    Raises:
        KeyError: an unknown task, naming the known ones; an override that no config file of the task defines (as
            ``monai.bundle run`` refuses it), naming the closest ids.
        FileNotFoundError, ValueError: from ``initialize`` (missing weights, weights of another network, a sampler
            the model cannot use), the bundle's own one-line error rather than MONAI's wrapper of it.
    """
    if task not in SERVED_WORKFLOWS:
        raise KeyError(f"no served task '{task}'; choose one of {sorted(SERVED_WORKFLOWS)}.")
    root = Path(scripts.BUNDLE_ROOT)
    files = [str(root / COMMON), str(root / SERVED_WORKFLOWS[task])]
    overrides = dict(overrides or {})
    check_known_keys(files, list(overrides), prefix=f"{task} override ")
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    try:
        parser.get_parsed_content("initialize")
    except Exception as e:
        cause = bundle_cause(e)
        if cause is None:
            raise
        raise cause from None
    return parser
