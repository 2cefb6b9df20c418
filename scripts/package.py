"""Package the bundle as a MONAI Model Zoo zip: ``dist/<name>_v<version>.zip`` holding one ``<name>/`` folder.

    python -m scripts.package                       # configs, scripts, docs, apps, LICENSE, README, main.py,
                                                    # large_files.yml, empty models/
    python -m scripts.package --weights true        # also the trained weights in models/
    python -m scripts.package --weights true --weights_url https://host/releases/v0.3.0
                                                    # and list them in large_files.yml with their URL and md5

Name, version and changelog come from ``configs/metadata.json``: bump ``version`` and add its ``changelog`` entry
before packaging. A version already packaged (its zip exists, or ``dist/packaged.json`` records it or a later one)
is refused. Caches, logs, outputs, data, tests and benchmarks are left out, as Model Zoo bundles ship no tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from scripts.storage import atomic_write, atomic_write_json

__all__ = ["WEIGHT_FILES", "PackageError", "bundle_files", "bundle_name", "large_files_yaml", "package"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# what a Model Zoo bundle ships; everything else (cache/, data/, logs/, outputs/, dist/, tests/, bench/) stays out
INCLUDED = ("configs", "scripts", "docs", "apps", "LICENSE", "README.md", "requirements.txt", "large_files.yml",
            "main.py")
EXCLUDED_PARTS = {"__pycache__", "cache", "logs", "outputs", "mlruns", ".ipynb_checkpoints"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo", ".tmp"}

# released weights, in the order inference needs them: stage 1, stage 2 (EMA and raw), the stage-2 checkpoint and the
# training record beside the weights (scale factor, noise schedule, prediction type, spacing: see scripts/records.py)
WEIGHT_FILES = ("model_autoencoder.pt", "model_ema.pt", "model.pt", "checkpoint_diffusion.pt", "model_record.json")
RECORD_FILE = "packaged.json"


class PackageError(ValueError):
    """Packaging refused; the message says why and what to change."""


def bundle_name(metadata: dict) -> str:
    """Model Zoo folder name from the metadata ``name``: lower case, words joined by ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", str(metadata["name"]).lower()).strip("_")


def _version_key(version: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", version):
        raise PackageError(f"configs/metadata.json: version '{version}' is not of the form MAJOR.MINOR.PATCH.")
    return tuple(int(p) for p in version.split("."))


def _walk(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if p.is_file() and not (set(rel) & EXCLUDED_PARTS) and not any(r.startswith(".") for r in rel) \
                and p.suffix not in EXCLUDED_SUFFIXES:
            yield p


def bundle_files(root: Path, weights: Sequence[str] = ()) -> list[tuple[Path, str]]:
    """(source file, path inside the bundle) for every file the package ships.

    Args:
        root: bundle root.
        weights: file names under ``models/`` to include.
    """
    files = []
    for name in INCLUDED:
        path = root / name
        if not path.exists():
            raise PackageError(f"'{path}' is missing; a Model Zoo bundle ships {', '.join(INCLUDED)}.")
        files += [(p, p.relative_to(root).as_posix()) for p in _walk(path)]
    files += [(root / "models" / w, f"models/{w}") for w in weights]
    return files


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # the hash type of the Model Zoo large_files.yml; not for security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def large_files_yaml(models_dir: Path, weights: Sequence[str], url: str) -> str:
    """``large_files.yml`` in the Model Zoo format, listing ``weights`` at ``<url>/<file name>`` with their md5."""
    lines = ["# Released weights: `python -m monai.bundle download_large_files --bundle_path <bundle root>` fetches",
             "# each `url` into `path` and checks its hash.", "large_files:"]
    for w in weights:
        lines += [f'  - path: "models/{w}"', f'    url: "{url.rstrip("/")}/{w}"',
                  f'    hash_val: "{_md5(models_dir / w)}"', '    hash_type: "md5"']
    return "\n".join(lines) + "\n"


def _check_version(version: str, metadata: dict, zip_path: Path, record: dict) -> None:
    if version not in metadata.get("changelog", {}):
        raise PackageError(f"configs/metadata.json: version {version} has no changelog entry; "
                           "add one before packaging.")
    if zip_path.exists():
        raise PackageError(f"version {version} is already packaged as '{zip_path}'; bump 'version' in "
                           "configs/metadata.json (with a changelog entry) to package again.")
    done = [v for v in record if _version_key(v) >= _version_key(version)]
    if done:
        raise PackageError(f"version {version} is not newer than version {max(done, key=_version_key)} recorded in "
                           f"'{zip_path.parent / RECORD_FILE}'; bump 'version' in configs/metadata.json.")


def package(output_dir: str | None = None, weights: bool = False, weights_url: str | None = None,
            name: str | None = None, bundle_root: str | None = None) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip`` in the MONAI Model Zoo layout and record the version.

    Examples::

        python -m scripts.package
        python -m scripts.package --weights true --output_dir /tmp/release
        python -m scripts.package --weights true --weights_url https://example.org/releases/v0.3.0

    Args:
        output_dir: folder of the zip and of ``packaged.json`` (default ``<bundle root>/dist``).
        weights: include the trained weights found in ``models/`` (``model_autoencoder.pt`` is required;
            ``model_ema.pt``, ``model.pt``, ``checkpoint_diffusion.pt`` and ``model_record.json`` when present).
        weights_url: where the weights will be published; the packaged ``large_files.yml`` then lists each of them
            with this URL prefix and its md5, so ``monai.bundle download_large_files`` can fetch them.
        name: bundle folder name (default: ``name`` in configs/metadata.json in lower snake case).
        bundle_root: bundle to package (default: this one).

    Returns:
        The path of the zip.

    Raises:
        PackageError: version already packaged or without changelog entry, a shipped file or a weight missing.
    """
    root = Path(bundle_root).resolve() if bundle_root else BUNDLE_ROOT
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    name = name or bundle_name(metadata)
    version = str(metadata["version"])
    out = Path(output_dir) if output_dir else root / "dist"
    zip_path = out / f"{name}_v{version}.zip"
    record_path = out / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    _check_version(version, metadata, zip_path, record)

    found = [w for w in WEIGHT_FILES if (root / "models" / w).is_file()]
    if (weights or weights_url) and "model_autoencoder.pt" not in found:
        raise PackageError(f"no trained weights in '{root / 'models'}' (model_autoencoder.pt is missing); train the "
                           "bundle first or package without --weights/--weights_url.")
    shipped = found if weights else []
    files = bundle_files(root, shipped)
    large_files = large_files_yaml(root / "models", found, weights_url) if weights_url else None

    def _write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{name}/models/", "")
            for src, arc in files:
                if arc == "large_files.yml" and large_files is not None:
                    zf.writestr(f"{name}/{arc}", large_files)
                else:
                    zf.write(src, f"{name}/{arc}")

    atomic_write(zip_path, _write)
    record[version] = {"zip": zip_path.name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "weights": shipped,
                       "large_files": found if weights_url else [], "changelog": metadata["changelog"][version]}
    atomic_write_json(record, record_path)
    size = zip_path.stat().st_size / 2**20
    print(f"packaged {name} v{version}: {zip_path} ({len(files)} files, {size:.2f} MiB; weights: "
          f"{', '.join(shipped) or 'none'}{'; large_files.yml lists ' + ', '.join(found) if weights_url else ''})")
    return str(zip_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m scripts.package [--output_dir DIR] [--weights true] [--weights_url URL]``."""
    import fire

    try:
        fire.Fire(package, command=list(sys.argv[1:] if argv is None else argv), serialize=lambda _: None)
    except PackageError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
