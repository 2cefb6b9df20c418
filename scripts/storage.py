"""Atomic writes, safe checkpoint loading and never-overwriting output paths.

Everything the bundle writes goes through this module, so that an interrupted run never leaves a
half-written checkpoint or volume behind and a new run never silently replaces an earlier output.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_save",
    "atomic_write",
    "atomic_write_json",
    "file_sha256",
    "load_checkpoint",
    "new_run_dir",
    "remove_stale_temporaries",
    "sha256_mismatch",
    "unique_path",
]


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The rename is atomic on POSIX file systems: readers see either the old file or the complete new one.

    Args:
        path: final destination.
        write_fn: writes the content to the temporary path it receives.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_name(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename: a crash of the machine leaves old or new, never empty
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _temporary_name(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files :func:`atomic_write` writes for ``path``; the suffix is kept, as some
    writers (nibabel, PIL) pick the format from it."""
    return f".{path.name.split('.')[0]}-", "".join(path.suffixes) or ".tmp"


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an :func:`atomic_write` of ``path`` killed mid-write left beside it (the
    file itself is untouched: it is the last complete version). Call it only while no other process writes ``path``.

    Returns:
        The files removed.
    """
    path = Path(path)
    prefix, suffix = _temporary_name(path)
    stale = sorted(path.parent.glob(f"{prefix}*{suffix}")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    return atomic_write(path, _write)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` and turn failures into one clear message.

    Args:
        path: checkpoint file.
        map_location: device to map tensors onto.
        what: words naming the checkpoint in the error message, e.g. ``"autoencoder weights"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a loadable weights-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found: '{path}'. Train that stage first, or point the config at an existing file."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot load {what} from '{path}' with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "The file is corrupt or not a PyTorch checkpoint; re-train or re-export it."
        ) from e


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """Return the first ``length`` hex digits of the SHA-256 of a file. A file is read once per process while its
    size and modification time stay the same (generation checks and records the same weight files)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key][:length]


def sha256_mismatch(path: str | os.PathLike, expected: str | None) -> str | None:
    """The file's sha256 when it exists and differs from ``expected``; ``None`` when it matches, when nothing is
    expected, or when the file is missing (the loader reports that)."""
    if not expected or not Path(path).is_file():
        return None
    actual = file_sha256(path)
    return actual if actual != expected else None


def unique_path(path: str | os.PathLike) -> Path:
    """Return ``path`` if nothing exists there, else the first free ``<stem>_1<suffix>``, ``<stem>_2<suffix>``..."""
    path = Path(path)
    if not path.exists():
        return path
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    n = 1
    while True:
        candidate = path.with_name(f"{stem}_{n}{suffix}")
        if not candidate.exists():
            return candidate
        n += 1


def new_run_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """Create and return a new, empty folder ``parent/<prefix>_<YYYYmmdd-HHMMSS>[_n]`` that no earlier run used.

    On ranks other than 0 of a ``torchrun`` job nothing is created: their writers are switched off, and the path
    returned (``..._rank<r>``) is never made, so a stray write from a non-zero rank would show.
    """
    parent = Path(parent)
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        return parent / f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}_rank{rank}"
    parent.mkdir(parents=True, exist_ok=True)
    base = parent / f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}"
    while True:
        candidate = unique_path(base)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:  # another process took it between the check and the mkdir
            continue
