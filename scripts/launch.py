"""The LDM-style command line (``main.py``): ``--base`` configs, ``-t`` to train, ``--name``, ``--resume``.

Every run lives in ``<logdir>/<timestamp>_<name>/``:

- ``configs/launch.json``: the config files, overrides and test-only overrides of the run (what ``--resume`` and the
  test run read back), the world size and package versions; ``configs/<timestamp>-project.json``: the merged,
  macro-resolved config with the overrides applied, one per start (the provenance snapshot);
- ``models/``: checkpoints and weights (``model_autoencoder.pt``, ``model.pt``, ``model_ema.pt``, ``checkpoint_*.pt``);
  a stage-2 run keeps a copy of its frozen autoencoder there, so the run folder is self-contained;
- ``train_*_<time>/``: TensorBoard events, PNG previews and loss curves of each training start;
- ``generated_<time>/`` or ``reconstruction_<time>/``: the output of each test run.

The bundle workflows do the work (``monai.bundle.run``); this module only chooses files and overrides. Every workflow
is merged after ``configs/common.json`` (the shared definitions): when ``--base`` does not name it, it is put first
(:func:`with_common`), so ``--base configs/train_autoencoder.json`` runs ``configs/common.json`` +
``configs/train_autoencoder.json``. Two keys of the training configs tell it what to run: ``test_config`` (the
workflow of a run without ``-t``, merged after common.json too) and ``multi_gpu_overlay`` (merged when ``torchrun``
starts more than one process).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
COMMON = BUNDLE_ROOT / "configs" / "common.json"

#: LDM / PyTorch Lightning keys -> this bundle's ids (``None``: handled by the launcher itself)
ALIASES = {
    "model.base_learning_rate": "base_learning_rate",
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "lightning.trainer.accumulate_grad_batches": "gradient_accumulation_steps",
    "lightning.trainer.max_epochs": "max_epochs",
    "limit_test_batches": None,
    "lightning.trainer.limit_test_batches": None,
}
#: ids that set how many items a test workflow produces, first one the test config defines wins
TEST_LIMIT_IDS = ("num_samples", "max_cases")
TEST_ONLY = "test_only_params"

EPILOG = """examples (from the bundle root):
  python main.py --base configs/train_autoencoder.json -t --name ae max_epochs=2
  torchrun --nproc-per-node=2 main.py --base configs/train_autoencoder.json -t --name ae
  torchrun --nproc-per-node=2 main.py --base configs/train_diffusion.json \\
      -t --name ldm load_autoencoder_path=logs/<time>_ae accumulate_grad_batches=2 base_learning_rate=1e-4
  python main.py --base configs/train_diffusion.json --name ldm limit_test_batches=8 \\
      test_only_params#sampler=ddpm          # no -t: generate with the latest run named 'ldm'
  python main.py --resume logs/<time>_ldm -t max_epochs=400   # continue training (also after SIGTERM/SIGUSR1)
configs/common.json (the shared definitions) is merged first when --base does not name it.
overrides are key=value with MONAI ids ('#' joins nested keys, e.g. autoencoder_def#num_res_blocks=2); values are
JSON or Python literals.
LDM keys accepted as aliases: base_learning_rate, accumulate_grad_batches, max_epochs, limit_test_batches
(samples or volumes of the test run), test_only_params (overrides of the test run only); lightning.trainer.* and
model.* spellings too."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``main.py`` (LDM's option names)."""
    p = argparse.ArgumentParser(prog="main.py", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", metavar="CONFIG_OR_KEY=VALUE", default=[],
                   help="config files merged left to right, then key=value overrides (e.g. max_epochs=2)")
    p.add_argument("-t", "--train", action="store_true", help="train; without it, run the config's test workflow "
                   "(generation for a diffusion config, reconstruction for an autoencoder config)")
    p.add_argument("-n", "--name", default="", help="experiment name: the run folder is <logdir>/<time>_<name>; "
                   "without -t, the latest run of that name is tested")
    p.add_argument("-r", "--resume", default="",
                   help="a run folder (or a checkpoint inside it) to continue (-t) or test")
    p.add_argument("-l", "--logdir", default="logs", help="folder of the run folders (default: logs)")
    p.add_argument("-f", "--postfix", default="", help="appended to the run folder's name")
    p.add_argument("-s", "--seed", type=int, default=None, help="seed of training and sampling (the config's 'seed')")
    p.add_argument("--scale_lr", type=_boolean, default=None,
                   help="lr = base_learning_rate x world size x batch size x accumulation "
                        "(default: the config's scale_lr)")
    p.add_argument("--no-test", "--no_test", dest="no_test", action="store_true",
                   help="with -t: do not run the test workflow after training")
    return p


def _boolean(text: str) -> bool:
    from scripts.checks import as_bool

    try:
        return as_bool(text, "--scale_lr")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_value(text: str) -> Any:
    """A command-line value: JSON, else a Python literal, else the text itself (``$``-expressions stay text)."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def split_base(tokens: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``--base`` tokens and trailing arguments -> (config files, ``{key: value}`` overrides)."""
    files, overrides = [], {}
    for token in tokens:
        if "=" in token and not token.lower().endswith((".json", ".yaml", ".yml")):
            key, _, value = token.partition("=")
            overrides[key.strip()] = parse_value(value)
        else:
            files.append(token)
    return files, overrides


def apply_aliases(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """Split overrides into (all-run overrides with LDM aliases renamed, test-only overrides, test limit)."""
    general, test_only, limit = {}, {}, None
    for key, value in overrides.items():
        if key in ALIASES and ALIASES[key] is None:
            limit = int(value)
        elif key in ALIASES:
            general[ALIASES[key]] = value
        elif key == TEST_ONLY:
            if not isinstance(value, Mapping):
                raise ValueError(f"{TEST_ONLY} must be a JSON object of overrides, got {value!r}.")
            test_only.update({_hashed(k): v for k, v in value.items()})
        elif key.startswith((TEST_ONLY + "#", TEST_ONLY + ".")):
            test_only[_hashed(key[len(TEST_ONLY) + 1:])] = value
        else:
            general[_hashed(key)] = value
    return general, test_only, limit


def _hashed(key: str) -> str:
    """LDM's dotted nesting (``train.trainer.max_epochs``) in MONAI's spelling (``train#trainer#max_epochs``)."""
    return key.replace(".", "#") if "#" not in key and "::" not in key else key


def _absolute_files(files: Sequence[str], cwd: Path) -> list[str]:
    out = []
    for f in files:
        for candidate in (Path(f) if Path(f).is_absolute() else cwd / f, BUNDLE_ROOT / f):
            if candidate.is_file():
                out.append(str(candidate.resolve()))
                break
        else:
            raise FileNotFoundError(f"--base: config file '{f}' not found (relative to {cwd} or {BUNDLE_ROOT}).")
    return out


def _load(files: Sequence[str]) -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(list(files))


def _declares(file: str, key: str) -> bool:
    from monai.bundle import ConfigParser

    return key in ConfigParser.load_config_file(file)


def _bundle_files(value: str | Sequence[str]) -> list[str]:
    return [str((BUNDLE_ROOT / v).resolve()) for v in ([value] if isinstance(value, str) else value)]


def with_common(files: Sequence[str]) -> list[str]:
    """``files`` merged after ``configs/common.json``: it is put first when no file of ``files`` is it (run folders
    recorded before the configs were layered name only the workflow configs)."""
    common = str(COMMON.resolve())
    return list(files) if any(Path(f).resolve() == COMMON.resolve() for f in files) else [common, *files]


def train_files(files: Sequence[str], world_size: int) -> list[str]:
    """The training config files, with the config's ``multi_gpu_overlay`` appended when ``world_size > 1``."""
    merged = _load(files)
    if world_size > 1 and merged.get("multi_gpu_overlay"):
        extra = [f for f in _bundle_files(merged["multi_gpu_overlay"]) if f not in files]
        return [*files, *extra]
    return list(files)


def test_files(files: Sequence[str]) -> list[str]:
    """The test workflow of a training run: ``configs/common.json``, its ``test_config``, then the run's overlays
    (e.g. brats.json).

    Raises:
        ValueError: when no file defines ``test_config``, naming the fix.
    """
    merged = _load(files)
    if "test_config" not in merged:
        if "train" not in merged:  # already a test workflow, e.g. --base configs/inference.json
            return list(files)
        raise ValueError(f"--base {files}: no config defines 'test_config' (the workflow of a run without -t); "
                         "add \"test_config\": \"configs/inference.json\" or similar to your training config.")
    overlays = [f for f in files if Path(f) != COMMON.resolve() and not _declares(f, "test_config")
                and not _declares(f, "multi_gpu_overlay")]
    return with_common([*_bundle_files(merged["test_config"]), *overlays])


def check_keys(files: Sequence[str], overrides: Mapping[str, Any], what: str) -> None:
    """Fail, naming the key and close matches, on an override that the merged ``files`` do not define."""
    from scripts.checks import find_unknown_keys

    unknown = find_unknown_keys(files, list(overrides))
    if unknown:
        key, close = unknown[0]
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown {what} key '{key}': no config in {[Path(f).name for f in files]} defines it.{hint}")


def carried(files: Sequence[str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The training overrides that also name an id of the test workflow (network sizes, data, paths)."""
    from scripts.checks import find_unknown_keys

    unknown = {k for k, _ in find_unknown_keys(files, list(overrides))}
    return {k: v for k, v in overrides.items() if k not in unknown}


def find_run(logdir: Path, name: str) -> Path:
    """The latest run folder ``<logdir>/<time>_<name>`` with a ``configs/launch.json``."""
    runs = sorted(p for p in logdir.glob(f"*_{name}") if (p / "configs" / "launch.json").is_file()) if name else []
    if not runs:
        raise FileNotFoundError(f"no run named '{name}' under '{logdir}': train it first with "
                                f"`python main.py --base <config> -t --name {name or '<name>'}`, "
                                "or pass --resume <run folder>.")
    return runs[-1]


def run_folder(resume: str) -> Path:
    """The run folder of ``--resume``: the folder itself, or the run holding a checkpoint file."""
    path = Path(resume).resolve()
    run = path.parent.parent if path.is_file() else path
    if not (run / "configs" / "launch.json").is_file():
        raise FileNotFoundError(f"--resume '{resume}': not a run folder of main.py (no configs/launch.json); "
                                "pass logs/<time>_<name>.")
    return run


def first_stage(value: Any, cwd: Path) -> Path:
    """The autoencoder weights a stage-2 run trains on: a file, or a stage-1 run folder (its models/ weights);
    a relative path is taken from ``cwd``."""
    path = (cwd / str(value)).resolve()
    if path.is_dir():
        path = path / "models" / "model_autoencoder.pt"
    if not path.is_file():
        raise FileNotFoundError(f"load_autoencoder_path: no autoencoder weights at '{path}'. Train stage 1 first "
                                "(python main.py --base configs/train_autoencoder.json -t --name ae) and pass "
                                "load_autoencoder_path=logs/<time>_ae.")
    return path


def snapshot(run: Path, files: Sequence[str], overrides: Mapping[str, Any]) -> Path:
    """Write the merged, macro-resolved config with ``overrides`` applied to ``run/configs/<time>-project.json``."""
    from monai.bundle import ConfigParser

    from scripts.storage import atomic_write_json, unique_path

    parser = ConfigParser(_load(files))
    for key, value in overrides.items():
        parser[key] = value
    parser.resolve_macro_and_relative_ids()
    path = unique_path(run / "configs" / f"{time.strftime('%Y%m%d-%H%M%S')}-project.json")
    atomic_write_json(parser.get(), path)
    return path


def _versions() -> dict[str, str]:
    import ignite
    import monai
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "monai": monai.__version__,
            "ignite": ignite.__version__}


def _share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the run folder's name, chosen once); joins the process group first."""
    from scripts import distributed

    if distributed.world_size() == 1:
        return value
    distributed.init_process_group()
    return distributed.broadcast_object(value)


def run_workflow(files: Sequence[str], overrides: Mapping[str, Any]) -> None:
    """``monai.bundle run`` of ``files`` with ``overrides``, from the bundle root (where the macros resolve)."""
    from monai.bundle import run

    run(config_file=list(files), meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"), **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``main.py``; returns the exit status (``128 + signal`` after a preemption checkpoint)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown_flags = [r for r in rest if r.startswith("-")]
    if unknown_flags:
        parser.error(f"unknown option {unknown_flags[0]} (overrides are key=value, without dashes)")
    cwd = Path.cwd()
    files, cli = split_base([*args.base, *rest])
    if args.seed is not None:
        cli["seed"] = args.seed
    if args.scale_lr is not None:
        cli["scale_lr"] = args.scale_lr
    general, test_only, limit = apply_aliases(cli)

    from scripts import distributed
    from scripts.checks import typed_overrides

    logdir = (cwd / args.logdir).resolve()
    if args.resume:
        run = run_folder(args.resume if Path(args.resume).is_absolute() else str(cwd / args.resume))
    elif not args.train:
        if not files and not args.name:
            parser.error("give --base <config> and --name, or --resume <run folder>")
        run = find_run(logdir, args.name or Path(files[-1]).stem)
    else:
        if not files:
            parser.error("-t needs --base <config file(s)>")
        name = (args.name or Path(files[-1]).stem) + args.postfix
        from scripts.storage import unique_path

        run = Path(_share(str(unique_path(logdir / f"{time.strftime('%Y%m%dT%H%M%S')}_{name}"))))

    record_path = run / "configs" / "launch.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        record["files"] = with_common(record["files"])
        if files and [Path(f).name for f in with_common(_absolute_files(files, cwd))] != [
                Path(f).name for f in record["files"]]:
            print(f"note: using the config files of {run} ({[Path(f).name for f in record['files']]}), not --base")
        record["overrides"].update(general)
        record["test_only"].update(test_only)
        if limit is not None:
            record["limit_test_batches"] = limit
    else:
        record = {"name": run.name.split("_", 1)[-1], "files": with_common(_absolute_files(files, cwd)),
                  "overrides": general, "test_only": test_only, "limit_test_batches": limit}
    os.chdir(BUNDLE_ROOT)  # the overlays' remaining macros (multi_gpu_train_diffusion.json's) resolve from here
    paths = {"ckpt_dir": str(run / "models"), "output_dir": str(run)}

    if args.train:
        world = distributed.world_size()
        tfiles = train_files(record["files"], world)
        check_keys(tfiles, record["overrides"], "override")
        overrides = typed_overrides(tfiles, {**record["overrides"], **paths})
        fresh = not (run / "models").is_dir() or not any((run / "models").glob("checkpoint_*.pt"))
        if "load_autoencoder_path" in _load(tfiles):
            copy = run / "models" / "model_autoencoder.pt"
            if distributed.is_main_rank() and not copy.is_file():
                source = first_stage(record["overrides"].get("load_autoencoder_path", BUNDLE_ROOT / "models"
                                                             / "model_autoencoder.pt"), cwd)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy)
                print(f"stage-2 run: frozen autoencoder {source} copied to {copy}")
            distributed.barrier()
            overrides["load_autoencoder_path"] = record["overrides"]["load_autoencoder_path"] = str(copy)
        if not fresh:
            overrides["resume"] = True
        if distributed.is_main_rank():
            from scripts.storage import atomic_write_json

            (run / "configs").mkdir(parents=True, exist_ok=True)
            record.update(world_size=world, versions=_versions(), command=sys.argv)
            atomic_write_json(record, record_path)
            print(f"run folder: {run} (config snapshot {snapshot(run, tfiles, overrides).name})")
        distributed.barrier()
        run_workflow(tfiles, overrides)
        from scripts.handlers import TrainingCheckpoint

        if TrainingCheckpoint.stopped_by is not None:
            return 128 + int(TrainingCheckpoint.stopped_by)
        if args.no_test:
            return 0
    if not distributed.is_main_rank():  # the test workflow runs once, on rank 0
        return 0

    efiles = test_files(record["files"])
    overrides = {**carried(efiles, record["overrides"]), **paths}
    merged_test = _load(efiles)
    if record.get("limit_test_batches") is not None:
        target = next((k for k in TEST_LIMIT_IDS if k in merged_test), None)
        if target is None:
            raise KeyError(f"limit_test_batches: the test workflow {[Path(f).name for f in efiles]} has none of "
                           f"{list(TEST_LIMIT_IDS)}.")
        overrides[target] = record["limit_test_batches"]
    test_only = {**{_hashed(k): v for k, v in _load(record["files"]).get(TEST_ONLY, {}).items()}, **record["test_only"]}
    check_keys(efiles, test_only, TEST_ONLY)
    overrides = typed_overrides(efiles, {**overrides, **test_only})
    print(f"test run of {run}: {[Path(f).name for f in efiles]}")
    run_workflow(efiles, overrides)
    return 0
