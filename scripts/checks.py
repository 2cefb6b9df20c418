"""Checks that run before any training starts: override keys that name nothing or cannot be set, command-line
values typed against the config, sizes the networks cannot take.

``monai.bundle run`` silently adds any key given on its command line; a typo such as
``--train#trainer#max_epoch 2`` would train with the default. ``check_overrides`` turns that into an error that
names the key and the closest existing ones.

``monai.bundle run`` (python-fire) also passes ``--amp false`` as the text ``'false'``, which Python reads as true.
:func:`typed_overrides` is the one place where command-line values are typed: a key whose default is a JSON
boolean receives a boolean. ``check_overrides`` applies it to the running workflow (every workflow's first
``initialize`` step), and ``main.py`` (:mod:`scripts.launch`) to its ``key=value`` overrides, so no config
consumer ever sees the text.

Every workflow config is merged after ``configs/common.json``, which holds the shared definitions.
:func:`check_layering` (also run by ``check_overrides``) turns a workflow started without it, or with it merged
later, into one line that names the fix instead of a MONAI reference error deep in the config.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

__all__ = ["BOOLEAN_WORDS", "COMMON", "REFUSED", "as_bool", "check_known_keys", "check_layering", "check_overrides",
           "common_default", "find_unknown_keys", "typed_overrides"]

#: the shared definitions, merged first by every workflow (relative to the bundle root, as the commands name it)
COMMON = "configs/common.json"
COMMON_PATH = Path(__file__).resolve().parents[1] / COMMON

# arguments of `monai.bundle run` itself, never config keys
RUN_ARGUMENTS = {
    "config_file", "meta_file", "logging_file", "args_file", "tracking", "init_id", "run_id", "final_id",
    "workflow_type", "workflow_name", "properties_path", "run_name", "net_id", "filepath", "n", "any", "p",
}
# top-level keys that `--tracking mlflow` adds to the config (MONAI's DEFAULT_MLFLOW_SETTINGS), so overridable
RUN_ARGUMENTS |= {"tracking_uri", "experiment_name", "save_execute_config", "is_not_rank0"}


#: command-line spellings of a boolean (``monai.bundle run --flag false`` passes the text ``'false'``)
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

#: boolean keys whose default is an expression (typed like the JSON booleans): key -> what the default computes
COMPUTED_BOOLEANS = {"amp": "on where bfloat16 autocast is fast (scripts.engines.bf16_is_fast)"}

#: boolean keys that also take text: key -> what the text means
ALSO_TEXT = {"resume": "the path of a checkpoint to resume from"}

#: keys a workflow computes, which an override would silently contradict: key -> why, and what to set instead
REFUSED = {
    "latent_shape": (
        "latent_shape is derived from volume_size (image_size in generation) and the autoencoder's downsampling, "
        "with latent_channels channels; set --volume_size (or --image_size) and --latent_channels instead."
    ),
}


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean: a bool as is, the integers 0 and 1, or a word of :data:`BOOLEAN_WORDS`.

    Raises:
        ValueError: on anything else, naming ``name`` and the accepted words.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in BOOLEAN_WORDS:
        raise ValueError(f"{name}: expected true or false, got '{value}'.")
    return BOOLEAN_WORDS[word]


def _config_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return [str(v) for v in ast.literal_eval(value)]
    return [v for v in value.split(",") if v]


def _parse_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(config files, ``{override key: text}``) from a ``monai.bundle run`` command line; a flag without a value
    (``--amp``) is ``True``, as python-fire reads it."""
    files: list[str] = []
    overrides: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            i += 1
            continue
        key, eq, inline = token[2:].partition("=")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 2
        else:
            value, i = True, i + 1
        if key == "config_file":
            files = _config_files(str(value))
        elif key not in RUN_ARGUMENTS:
            overrides[key] = value
    return files, overrides


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


def check_known_keys(config_files: Sequence[str], keys: Sequence[str], prefix: str = "--") -> None:
    """Refuse an override key that the merged config files do not define.

    Raises:
        KeyError: naming the first unknown key (written ``<prefix><key>``) and the closest known ones.
    """
    unknown = find_unknown_keys(config_files, keys)
    if unknown:
        key, close = unknown[0]
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"unknown config key '{prefix}{key}': no config file in {list(config_files)} defines it.{hint} "
            "Fix the override (nested keys are joined with '#')."
        )


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


def _config_list(files: Sequence[str]) -> str:
    """``files`` as a ``--config_file`` value: the list form that ``monai.bundle run`` accepts."""
    return '"[' + ",".join(f"'{f}'" for f in files) + ']"'


def config_strings(node: Any):
    """Every string in a config tree (dict values and list items, recursively)."""
    if isinstance(node, Mapping):
        for value in node.values():
            yield from config_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from config_strings(value)
    elif isinstance(node, str):
        yield node


def top_id(ref: str) -> str:
    """The top-level id of a reference such as ``train#trainer``."""
    return re.split(r"::|#", ref)[0]


def _referenced_ids(config: Mapping[str, Any]) -> set[str]:
    """Top-level ids that ``config`` (its metadata excepted) references with ``@``."""
    return {top_id(ref) for key, value in config.items() if key != "_meta_"
            for s in config_strings(value) for ref in ReferenceResolver.match_refs_pattern(s)}


def check_layering(config: Mapping[str, Any], files: Sequence[str] = ()) -> None:
    """Fail with one line when the workflow is not merged after ``configs/common.json``.

    Args:
        config: the merged config of the workflow (macros resolved or not).
        files: its config files in merge order, when known (the ``monai.bundle run`` command line); used to
            check that ``common.json`` comes first and to print the command with the fix.

    Raises:
        ValueError: ``common.json`` is merged after another file, or ``config`` references shared ids that only
            ``common.json`` defines; the message names the ``--config_file`` value that fixes it.
    """
    files = [str(f) for f in files]
    commons = [f for f in files if Path(f).name == COMMON_PATH.name]
    others = [f for f in files if f not in commons]
    fixed = _config_list([commons[0] if commons else COMMON, *others]) if files else None
    if commons and files[0] != commons[0]:
        raise ValueError(f"{COMMON} is merged first, before the workflow config and overlays: --config_file {fixed} "
                         f"({COMMON} holds the shared definitions).")
    shared = set(ConfigParser.load_config_file(str(COMMON_PATH)))
    missing = sorted((_referenced_ids(config) - set(config)) & shared)
    if missing:
        workflow = " and ".join(others) if files else "the workflow config"
        fix = f"--config_file {fixed}" if files else f"config_file=['{COMMON}', <workflow config>, <overlays>]"
        what = f"'{missing[0]}'" + (f" and {len(missing) - 1} more shared ids" if len(missing) > 1 else "")
        raise ValueError(f"{workflow} {'are' if len(others) > 1 else 'is'} merged after {COMMON}: {fix} "
                         f"({COMMON} defines {what} that the workflow reads).")


def common_default(key: str) -> Any:
    """The value of the top-level id ``key`` in this bundle's ``configs/common.json`` as written there, whichever the
    working folder and whatever the merged workflow made of the id (generation's ``recipe``: the defaults for weights
    without a training record).

    Raises:
        KeyError: ``common.json`` has no id ``key``; the message names the file.
    """
    common = ConfigParser.load_config_file(str(COMMON_PATH))
    if key not in common:
        raise KeyError(f"{COMMON_PATH} has no id '{key}'; fix the config that asks for it.")
    return common[key]


def _default(config: Any, key: str, depth: int = 0) -> Any:
    """The value ``key`` has in ``config`` (macros resolved), following plain ``@id`` references."""
    node = config
    for part in key.replace("::", "#").split("#"):
        node = node[part] if isinstance(node, dict) else node[int(part)]
    if isinstance(node, str) and node.startswith("@") and depth < 8 and _exists(config, node[1:]):
        return _default(config, node[1:], depth + 1)
    return node


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def typed_overrides(config_files: Sequence[str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` typed against the defaults of the merged ``config_files``: the one converter of
    command-line values. A key whose default is a JSON boolean (or one of :data:`COMPUTED_BOOLEANS`) receives a
    boolean (``'false'`` -> ``False``, by :func:`as_bool`); expressions (``$...``, ``@id``) and every other value
    pass unchanged.

    Keys that do not exist are left to :func:`find_unknown_keys`. Relative config paths (and the overlays' macros)
    resolve from the working folder.

    Raises:
        ValueError: a key of :data:`REFUSED` (computed by the workflow), or a boolean key given another text;
            one line naming the key, why, and what to use instead.
    """
    parser = ConfigParser(ConfigParser.load_config_files(list(config_files)))
    parser.resolve_macro_and_relative_ids()
    defaults = parser.get()
    typed = dict(overrides)
    for key, value in overrides.items():
        if not _exists(defaults, key):
            continue
        default = _default(defaults, key)
        if key in REFUSED and _is_expression(defaults.get(key)):
            raise ValueError(f"--{key} cannot be overridden: {REFUSED[key]}")
        boolean = isinstance(default, bool) or key in COMPUTED_BOOLEANS
        if not boolean or isinstance(value, bool) or _is_expression(value):
            continue
        if key in ALSO_TEXT and isinstance(value, str) and value.strip().lower() not in BOOLEAN_WORDS:
            continue  # e.g. --resume models/checkpoint_diffusion.pt
        also = f", or {ALSO_TEXT[key]}" if key in ALSO_TEXT else ""
        try:
            typed[key] = as_bool(value, f"--{key}")
        except ValueError:
            raise ValueError(f"--{key}: expected true or false{also}, got '{value}'.") from None
    return typed


def _active_resolver() -> Any:
    """The MONAI ``ReferenceResolver`` evaluating the config expression that called us, or ``None``.

    MONAI offers no hook between applying the command line and resolving the config; the first ``initialize``
    step runs before any other item is resolved, so retyping the resolver's items there reaches every consumer.
    """
    from monai.bundle.reference_resolver import ReferenceResolver

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ReferenceResolver):
            return owner
        frame = frame.f_back
    return None


def _retype(resolver: Any, key: str, value: Any) -> None:
    """Replace the config value of ``key`` (not yet resolved) in ``resolver`` and in its parent container."""
    key_id = resolver.normalize_id(key)
    if key_id in resolver.resolved_content:
        raise RuntimeError(f"'{key}' was resolved before check_overrides(); make it the first initialize step.")
    resolver.items[key_id].update_config(value)
    parent, _, last = key_id.rpartition(resolver.sep)
    container = resolver.items[parent].get_config()
    container[last if isinstance(container, dict) else int(last)] = value


def check_overrides(argv: Sequence[str] | None = None) -> bool:
    """Check and type the command-line overrides of a ``monai.bundle run``; the first ``initialize`` step of
    every workflow.

    Fails first when the workflow is not merged after ``configs/common.json`` (:func:`check_layering`, also
    outside ``monai.bundle run``), then on an override key that no config file defines, or one of :data:`REFUSED`;
    types the values by :func:`typed_overrides` and writes the typed values into the running workflow's config, so
    ``--amp false`` is ``False`` for every consumer. Reads ``sys.argv`` by default; checks no override when the
    process was not started by ``monai.bundle run`` (e.g. the Python API, where overrides are typed keyword
    arguments).

    Raises:
        KeyError: naming the unknown key and the closest known ones.
        ValueError: a workflow without ``configs/common.json`` first (see :func:`check_layering`), a refused key
            or a boolean key given another text (see :func:`typed_overrides`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    files, overrides = _parse_argv(argv)
    resolver = _active_resolver()
    if resolver is not None and "" in resolver.items:
        check_layering(resolver.items[""].get_config(), files)
    elif files:
        check_layering(ConfigParser.load_config_files(list(files)), files)
    if not files or not overrides:
        return True
    check_known_keys(files, list(overrides))
    if resolver is not None:  # the values as MONAI received them (python-fire has parsed numbers and lists)
        overrides = {k: resolver.items[resolver.normalize_id(k)].get_config() for k in overrides}
    for key, value in typed_overrides(files, overrides).items():
        if resolver is not None and value is not overrides[key]:
            _retype(resolver, key, value)
    return True
