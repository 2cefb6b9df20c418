"""Checks that run before any training starts: override keys that name nothing, sizes the networks cannot take.

``monai.bundle run`` silently adds any key given on its command line; a typo such as
``--train#trainer#max_epoch 2`` would train with the default. ``check_overrides`` turns that into an error that
names the key and the closest existing ones.
"""

from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["BOOLEAN_WORDS", "as_bool", "check_overrides", "find_unknown_keys"]

# arguments of `monai.bundle run` itself, never config keys
RUN_ARGUMENTS = {
    "config_file", "meta_file", "logging_file", "args_file", "tracking", "init_id", "run_id", "final_id",
    "workflow_type", "workflow_name", "properties_path", "run_name", "net_id", "filepath", "n", "any", "p",
}
# top-level keys that `--tracking mlflow` adds to the config (MONAI's DEFAULT_MLFLOW_SETTINGS), so overridable
RUN_ARGUMENTS |= {"tracking_uri", "experiment_name", "save_execute_config", "is_not_rank0"}


#: command-line spellings of a boolean (``monai.bundle run --flag false`` passes the text ``'false'``)
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean: a bool or number as is, a word of :data:`BOOLEAN_WORDS` by its meaning.

    Raises:
        ValueError: on any other text, naming ``name`` and the accepted words.
    """
    if not isinstance(value, str):
        return bool(value)
    word = value.strip().lower()
    if word not in BOOLEAN_WORDS:
        raise ValueError(f"{name}: expected true or false, got '{value}'.")
    return BOOLEAN_WORDS[word]


def _config_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return [str(v) for v in ast.literal_eval(value)]
    return [v for v in value.split(",") if v]


def _parse_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(config files, override keys) from a ``monai.bundle run`` command line."""
    files: list[str] = []
    keys: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--"):
            key, _, inline = token[2:].partition("=")
            value = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
            if key == "config_file":
                files = _config_files(value)
            elif key not in RUN_ARGUMENTS:
                keys.append(key)
            i += 1 if inline else 2
            continue
        i += 1
    return files, keys


def _exists(config: Any, key: str) -> bool:
    node = config
    for part in key.replace("::", "#").split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _all_keys(config: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(config, dict):
        for k, v in config.items():
            full = f"{prefix}#{k}" if prefix else str(k)
            keys.append(full)
            keys.extend(_all_keys(v, full))
    return keys


def find_unknown_keys(config_files: Sequence[str], keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Each key in ``keys`` that the merged config files do not define, with up to three close matches."""
    merged = ConfigParser.load_config_files(list(config_files))
    known = _all_keys(merged)
    return [(k, difflib.get_close_matches(k, known, n=3, cutoff=0.6)) for k in keys if not _exists(merged, k)]


def check_overrides(argv: Sequence[str] | None = None) -> bool:
    """Fail on a command-line override key that no config file defines.

    Reads the ``monai.bundle run`` command line (``sys.argv`` by default); does nothing when the process was not
    started that way (e.g. the Python API, where overrides are keyword arguments checked by the caller).

    Raises:
        KeyError: naming the unknown key and the closest known ones.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    files, keys = _parse_argv(argv)
    if not files or not keys:
        return True
    unknown = find_unknown_keys(files, keys)
    if unknown:
        key, close = unknown[0]
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"unknown config key '--{key}': no config file in {files} defines it.{hint} "
            "Fix the override (nested keys are joined with '#')."
        )
    return True

