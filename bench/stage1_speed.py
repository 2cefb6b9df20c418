"""Stage-1 training speed: this bundle's default recipe against the MONAI Model Zoo BraTS recipe.

What is measured
    Wall-clock seconds per stage-1 (VAE-GAN) training iteration of :class:`scripts.engines.AutoencoderTrainer`,
    for two recipes run on the same networks (same architecture and the same initial weights, seed 0), the same
    data and the same loss:

    * ``ours`` -- the bundle's default: one discriminator step per generator step (``d_train_steps=1``); AMP off
      on CPU, bfloat16 autocast on CUDA (``amp=True, amp_dtype="bfloat16"``).
    * ``reference`` -- the recipe of the MONAI Model Zoo ``brats_mri_generative_diffusion`` bundle: five
      discriminator steps per generator step (``d_train_steps=5``), in float32.

    Both train the adversarial term from the first iteration (``adversarial_warmup_epochs=0``), so every iteration
    is one autoencoder forward/backward plus ``d_train_steps`` discriminator updates, each of which runs the
    discriminator forward and backward on a real and a fake batch. The reference recipe pays for four extra
    discriminator updates per iteration; this benchmark shows what they (and, on CUDA, bfloat16 autocast) cost
    against the autoencoder step. The ``PatchDiscriminator`` downsamples in its first layer, so one of its updates is
    cheap next to the full-resolution autoencoder: on 2 CPU cores at 64^3, batch 2, about 0.06 s against about
    2.8 s for the autoencoder forward/backward, so the two recipes differ by only about 5-10 % per iteration there.

How
    Demo head phantoms (``scripts.demo_data.make_demo_dataset``) are written once into a temporary folder and
    loaded with nibabel into ``(B, 1, S, S, S)`` tensors scaled to [0, 1]. The trainer's ``train_data_loader`` is a
    plain Python list of ``{"image": tensor}`` batches already on the device, so no data loading is timed. Each
    iteration is timed between Ignite's ``ITERATION_STARTED`` and ``ITERATION_COMPLETED`` events (with a CUDA
    synchronisation on CUDA); the first ``--warmup`` iterations are discarded. The ``CPU/wall`` column is the process
    CPU time per wall-clock second over the measured iterations: on CPU, a value well below ``--threads`` means other
    processes competed for the cores and the timings are inflated (compare recipes only when both are near it); the
    script then prints a note.

    ``--rounds N`` runs each recipe N times, alternating the order (ours first, then reference first, ...), and
    pools the measured iterations: on a shared or throttled machine whose speed drifts by 10-20 % between runs,
    one round cannot resolve a difference of that size.

    Each recipe runs in its own subprocess, so that its peak resident memory (``ru_maxrss``) belongs to that recipe
    alone; on CUDA the peak of ``torch.cuda.max_memory_allocated`` is reported too. Peak RSS includes the Python
    interpreter, torch/MONAI and the loaded volumes, which both recipes share.

Usage (from the bundle root)::

    python bench/stage1_speed.py [--size 64] [--batch 2] [--iterations 6] [--warmup 2] [--channels 16,32,32]
                                 [--device cpu|cuda] [--threads N] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RECIPES: dict[str, dict[str, Any]] = {
    # on CPU "ours" runs in fp32 (AMP off); on CUDA it autocasts to bfloat16 (see recipe_kwargs)
    "ours": {"d_train_steps": 1, "amp_on_cuda": True},
    "reference": {"d_train_steps": 5, "amp_on_cuda": False},
}
BUSY_FRACTION = 0.8  # CPU/wall below this fraction of --threads flags a contended CPU measurement
MAX_DISTINCT_BATCHES = 8  # more batches than this are cycled: the content of a batch does not change the cost


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="voxels per axis of the training volumes")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch")
    parser.add_argument("--iterations", type=int, default=6, help="measured iterations per recipe")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before the measured ones")
    parser.add_argument("--channels", type=str, default="16,32,32", help="AutoencoderKL channels, comma separated")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to train on (default: cuda when available)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the machine's cores)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each recipe, alternating ours/reference then reference/ours; their measured iterations are\n"
        "pooled (use 3 or more on a machine whose speed drifts)",
    )
    # internal: a child process measuring one recipe on data the parent generated
    parser.add_argument("--_recipe", choices=sorted(RECIPES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_data_dir", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.channels = tuple(int(c) for c in args.channels.split(",") if c.strip())
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail early, with a clear message, on settings the networks cannot run with."""
    if args.iterations < 1 or args.warmup < 0 or args.batch < 1 or args.rounds < 1:
        raise SystemExit("--iterations, --batch and --rounds must be >= 1 and --warmup >= 0.")
    if not args.channels or any(c % 16 for c in args.channels):
        raise SystemExit("--channels must be multiples of 16 (norm_num_groups=16), e.g. 16,32,32.")
    factor = 2 ** (len(args.channels) - 1)
    if args.size % factor or args.size < 16:
        raise SystemExit(f"--size must be >= 16 and divisible by {factor} for {len(args.channels)} channel levels.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available.")


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def num_distinct_batches(args: argparse.Namespace) -> int:
    return min(args.warmup + args.iterations, MAX_DISTINCT_BATCHES)


def generate_data(data_dir: str, args: argparse.Namespace) -> None:
    """Write enough demo phantoms for the distinct training batches (plus one validation and one test subject)."""
    from scripts.demo_data import make_demo_dataset

    n_train = args.batch * num_distinct_batches(args)
    make_demo_dataset(data_dir, num_subjects=n_train + 2, size=args.size, num_validation=1, num_test=1)


def load_batches(data_dir: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The training volumes as ``warmup + iterations`` batches ``{"image": (B, 1, S, S, S)}`` on ``device``."""
    import nibabel as nib

    with open(os.path.join(data_dir, "datalist.json")) as f:
        training = json.load(f)["training"]
    volumes = []
    for entry in training:
        array = torch.from_numpy(nib.load(os.path.join(data_dir, entry["image"])).get_fdata(dtype="float32"))
        lo, hi = array.min(), array.max()
        volumes.append(((array - lo) / (hi - lo).clamp_min(1e-8))[None])  # (1, S, S, S) in [0, 1]
    distinct = [
        {"image": torch.stack(volumes[i * args.batch : (i + 1) * args.batch]).to(device)}
        for i in range(len(volumes) // args.batch)
    ]
    total = args.warmup + args.iterations
    return [distinct[i % len(distinct)] for i in range(total)]


# --------------------------------------------------------------------------------------------------
# one recipe (child process)
# --------------------------------------------------------------------------------------------------
def build_networks(channels: tuple[int, ...], device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``autoencoder_def`` (with ``channels``) and ``discriminator_def`` of ``configs/common.json`` (seeded, so both
    recipes start equal)."""
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(str(REPO_ROOT / "configs" / "common.json"))
    config.update({"autoencoder_channels": list(channels), "autoencoder_def#attention_levels": [False] * len(channels)})
    torch.manual_seed(0)
    autoencoder = config.get_parsed_content("autoencoder_def")
    discriminator = config.get_parsed_content("discriminator_def")
    return autoencoder.to(device), discriminator.to(device)


def recipe_kwargs(recipe: str, device: torch.device) -> dict[str, Any]:
    """Trainer arguments that differ between the recipes."""
    spec = RECIPES[recipe]
    amp = bool(spec["amp_on_cuda"]) and device.type == "cuda"
    return {"d_train_steps": spec["d_train_steps"], "amp": amp, "amp_dtype": "bfloat16"}


def attach_timer(trainer: Any, device: torch.device) -> list[tuple[float, float]]:
    """Record each iteration's (wall-clock, process CPU) seconds, ITERATION_STARTED -> ITERATION_COMPLETED."""
    from ignite.engine import Events

    durations: list[tuple[float, float]] = []
    started: list[tuple[float, float]] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @trainer.on(Events.ITERATION_STARTED)
    def _start(_: Any) -> None:
        sync()
        started.append((time.perf_counter(), time.process_time()))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(_: Any) -> None:
        sync()
        wall, cpu = started[-1]
        durations.append((time.perf_counter() - wall, time.process_time() - cpu))

    return durations


def measure_recipe(recipe: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``warmup + iterations`` iterations of one recipe; return its timings and peak memory."""
    from scripts.engines import AutoencoderTrainer
    from scripts.losses import AutoencoderLoss

    device = torch.device(args.device)
    batches = load_batches(args._data_dir, args, device)
    autoencoder, discriminator = build_networks(args.channels, device)
    kwargs = recipe_kwargs(recipe, device)
    trainer = AutoencoderTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=batches,
        g_network=autoencoder,
        g_optimizer=torch.optim.Adam(autoencoder.parameters(), lr=1e-4),
        loss_function=AutoencoderLoss(kl_weight=1e-6, adversarial_weight=0.01).to(device),
        d_network=discriminator,
        d_optimizer=torch.optim.Adam(discriminator.parameters(), lr=1e-4),
        adversarial_warmup_epochs=0,
        **kwargs,
    )
    durations = attach_timer(trainer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    if "adv_g" not in trainer.state.output["losses"]:
        raise RuntimeError("the adversarial loss was not active; the measurement would not match the recipe.")
    measured = [wall for wall, _ in durations[args.warmup :]]
    cpu = sum(c for _, c in durations[args.warmup :])
    return {
        "recipe": recipe,
        **kwargs,
        "iterations": len(measured),
        "seconds": measured,
        "mean_s": statistics.fmean(measured),
        "std_s": statistics.stdev(measured) if len(measured) > 1 else 0.0,
        # CPU seconds this process got per wall second; well below --threads on CPU means other processes competed
        "cpu_per_wall": cpu / sum(measured),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # KiB on Linux
        "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


# --------------------------------------------------------------------------------------------------
# parent: generate data, run both recipes in subprocesses, print the table
# --------------------------------------------------------------------------------------------------
def child_command(recipe: str, data_dir: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()),
        "--size", str(args.size), "--batch", str(args.batch),
        "--iterations", str(args.iterations), "--warmup", str(args.warmup),
        "--channels", ",".join(map(str, args.channels)), "--device", args.device,
        "--threads", str(args.threads),
        "--_recipe", recipe, "--_data_dir", data_dir,
    ]  # fmt: skip


def run_child(recipe: str, data_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one recipe in a fresh interpreter; return the JSON line it printed last."""
    proc = subprocess.run(
        child_command(recipe, data_dir, args), cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"recipe '{recipe}' failed (exit {proc.returncode}); its error is printed above.")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"recipe '{recipe}' printed no result line:\n{proc.stdout}")


def recipe_order(round_index: int) -> tuple[str, str]:
    """ours/reference in even rounds, reference/ours in odd ones, so that a steady drift of the machine's speed
    favours neither recipe over an even number of rounds."""
    return ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours")


def pool_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One recipe's result over several child runs: iterations pooled, peaks the largest of the runs."""
    seconds = [s for run in runs for s in run["seconds"]]
    peak_cuda = [run["peak_cuda_mib"] for run in runs if run["peak_cuda_mib"] is not None]
    return {
        **runs[0],
        "iterations": len(seconds),
        "seconds": seconds,
        "mean_s": statistics.fmean(seconds),
        "std_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "cpu_per_wall": sum(r["cpu_per_wall"] * sum(r["seconds"]) for r in runs) / sum(seconds),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "peak_cuda_mib": max(peak_cuda) if peak_cuda else None,
    }


def format_report(results: dict[str, dict[str, Any]], cuda: bool) -> str:
    """The results table followed by the speed-up and peak memory ratio lines."""
    header = f"{'recipe':<10} {'d_steps':>7} {'amp':>5} {'s/iter (mean ± std)':>22} {'CPU/wall':>8}"
    header += f" {'peak RSS MiB':>13}" + (f" {'peak CUDA MiB':>14}" if cuda else "")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        amp = "bf16" if r["amp"] else "fp32"
        timing = f"{r['mean_s']:.3f} ± {r['std_s']:.3f}"
        row = f"{name:<10} {r['d_train_steps']:>7} {amp:>5} {timing:>22} {r['cpu_per_wall']:>8.2f}"
        row += f" {r['peak_rss_mib']:>13.1f}" + (f" {r['peak_cuda_mib']:>14.1f}" if cuda else "")
        lines.append(row)
    ours, ref = results["ours"], results["reference"]
    lines.append("")
    lines.append(f"speed-up (reference s/iter / ours s/iter): {ref['mean_s'] / ours['mean_s']:.2f}x")
    lines.append(f"peak memory ratio (ours / reference): {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}")
    if cuda:
        lines.append(f"peak CUDA memory ratio (ours / reference): {ours['peak_cuda_mib'] / ref['peak_cuda_mib']:.2f}")
    return "\n".join(lines)


def contention_note(results: dict[str, dict[str, Any]], threads: int) -> str | None:
    """A warning when a CPU recipe got well under ``threads`` CPU seconds per second: other processes competed."""
    busy = [name for name, r in results.items() if r["cpu_per_wall"] < BUSY_FRACTION * threads]
    if not busy:
        return None
    return (
        f"note: CPU/wall of {', '.join(busy)} is below {BUSY_FRACTION:.1f} x {threads} threads: other processes "
        "competed for the cores, so these timings are inflated; rerun on an idle machine."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.threads = args.threads or cpu_cores()
    torch.set_num_threads(args.threads)
    if args._recipe is not None:
        print(json.dumps(measure_recipe(args._recipe, args)), flush=True)
        return

    import monai

    print(
        f"stage-1 training speed: {args.size}^3, batch {args.batch}, channels {list(args.channels)}, "
        f"{args.warmup} warm-up + {args.iterations} measured iterations x {args.rounds} round(s), "
        f"device {args.device}, {args.threads} threads (torch {torch.__version__}, monai {monai.__version__})",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="stage1_speed_") as data_dir:
        generate_data(data_dir, args)
        for round_index in range(args.rounds):
            for recipe in recipe_order(round_index):
                runs[recipe].append(run_child(recipe, data_dir, args))
    results = {recipe: pool_runs(recipe_runs) for recipe, recipe_runs in runs.items()}
    print(format_report(results, cuda=args.device == "cuda"), flush=True)
    note = contention_note(results, args.threads) if args.device == "cpu" else None
    if note:
        print(note, flush=True)


if __name__ == "__main__":
    main()
