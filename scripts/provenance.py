"""Provenance beside every run's outputs, whichever front door started it (``monai.bundle run``, ``main.py``, the
Python API): the merged config as it ran, the command line, package versions, the seed and the input weights'
hashes.

Each training workflow's ``initialize`` and generation call :func:`write_provenance` with their run folder; it
writes ``config.json`` (the merged, macro-resolved config with the overrides applied and typed) and
``provenance.json`` (time, command line, seed, versions, sha256 of each input weight file).
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scripts.storage import atomic_write_json, file_sha256

__all__ = ["PACKAGES", "hashed_facts", "merged_config", "package_versions", "write_provenance"]

#: the packages whose versions a run records
PACKAGES = ("torch", "monai", "pytorch-ignite", "nibabel", "numpy", "fire")


def package_versions() -> dict[str, str]:
    """Python and the versions of :data:`PACKAGES` (``"not installed"`` for a missing one)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def merged_config() -> dict[str, Any] | None:
    """The whole config of the running bundle workflow (files merged, macros resolved, overrides applied and
    typed), read from MONAI's resolver evaluating the calling config expression; ``None`` outside one."""
    from scripts.checks import _active_resolver

    resolver = _active_resolver()
    if resolver is None or "" not in resolver.items:
        return None
    return resolver.items[""].get_config()


def hashed_facts(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A manifest's extra facts: ``record`` with, for each key ending in ``_path`` that names a file, the file's
    sha256 under the same key ending in ``_sha256``."""
    facts = dict(record or {})
    for key, value in list(facts.items()):
        if key.endswith("_path") and value and Path(str(value)).is_file():
            facts[key.replace("_path", "_sha256")] = file_sha256(value)
    return facts


def write_provenance(run_dir: str | Path, inputs: Mapping[str, str | None] | None = None,
                     seed: int | None = None) -> Path | None:
    """Write ``config.json`` and ``provenance.json`` into ``run_dir`` (atomically); returns the provenance path.

    On ranks other than 0 of a ``torchrun`` job nothing is written (their ``run_dir`` is never created, see
    :func:`scripts.storage.new_run_dir`) and ``None`` is returned.

    Args:
        run_dir: the run's output folder.
        inputs: name -> weight file the run reads (hashed when it exists; e.g. the frozen autoencoder of stage 2).
        seed: the run's seed.
    """
    from scripts.distributed import is_main_rank

    if not is_main_rank():
        return None
    run_dir = Path(run_dir)
    config = merged_config()
    if config is not None:
        atomic_write_json(config, run_dir / "config.json")
    hashes = {name: file_sha256(path) for name, path in (inputs or {}).items() if path and Path(str(path)).is_file()}
    facts = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(getattr(sys, "orig_argv", sys.argv)),
             "seed": seed, "versions": package_versions(), "inputs_sha256": hashes,
             "config": "config.json" if config is not None else None}
    path = run_dir / "provenance.json"
    atomic_write_json(facts, path)
    return path
