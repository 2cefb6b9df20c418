"""Stage-2 speed: diffusion training on cached latents against per-iteration encoding, and sampling time.

What is measured
    1. Diffusion-training iterations per second of :class:`scripts.engines.diffusion_trainer.LatentDiffusionTrainer`
       on the same data, networks (same initial weights, seed 0), scheduler and optimiser, fed two ways:

       * ``cached`` -- this bundle's default: batches of the autoencoder's latent posteriors ``{"z_mu", "z_sigma"}``
         (from :func:`scripts.latents.encode_items`, computed once before training), ``PrepareLatents()``.
       * ``encode`` -- the MONAI Model Zoo ``brats_mri_generative_diffusion`` way: batches of images ``{"image"}``,
         ``PrepareLatents(autoencoder)`` running the frozen encoder on every iteration.
       * ``bare`` -- a reference for the engine overhead: a plain PyTorch loop doing the same maths as ``cached``
         (sample ``z = (mu + sigma * eps) * scale``, noise at uniform timesteps, UNet, MSE on the noise, AdamW
         step), without Ignite/MONAI.

       The one-time cost of building the cache (``encode_items`` over the training volumes) is reported too.
    2. Seconds per generated sample for each sampler at its default steps (``configs/inference.json``
       ``default_inference_steps``: ddpm 1000, ddim 50, pndm 50, rflow 30) with
       :func:`scripts.sampling.sample_latents` + :func:`scripts.sampling.decode_latents` on ``--samples`` samples
       drawn together (``scripts.sampling.initial_noise``), random weights. DDPM may be capped at
       ``--ddpm-steps`` steps; its sampling time is then extrapolated linearly to 1000 steps (the report says so).
    3. Peak memory of every measurement: each runs in its own subprocess and reports its ``ru_maxrss`` (which
       includes the interpreter, torch/MONAI and the loaded data); on CUDA also ``torch.cuda.max_memory_allocated``.

Networks are read from ``configs/common.json`` (``autoencoder_def``, ``network_def``) and schedulers are those of
its ``schedulers``, written out here; the optimiser is AdamW (lr 1e-4) as in ``configs/train_diffusion.json``.

How
    Demo head phantoms (``scripts.demo_data.make_demo_dataset``) are written once into a temporary folder and loaded
    with nibabel into ``(1, S, S, S)`` float tensors scaled to [0, 1]. Both trainer variants get a plain Python list
    of batch dicts already on the device as ``train_data_loader``, so no data loading is timed. Trainer iterations
    are timed between Ignite's ``ITERATION_STARTED`` and ``ITERATION_COMPLETED`` (with a CUDA synchronisation on
    CUDA); the first ``--warmup`` iterations are discarded. ``CPU/wall`` is the process CPU time per wall-clock second
    over the measured part: on CPU, a value well below ``--threads`` means other processes competed for the cores.

Usage (from the bundle root)::

    python bench/stage2_speed.py [--size 64] [--batch 2] [--iterations 10] [--warmup 2] [--samples 1]
                                 [--ddpm-steps 1000] [--device cpu|cuda] [--threads N]
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

TRAIN_VARIANTS = ("cached", "encode", "bare")
#: configs/inference.json "default_inference_steps"
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 50, "pndm": 50, "rflow": 30}
MAX_DISTINCT_BATCHES = 4  # more batches than this are cycled: the content of a batch does not change the cost
TARGET_SPEEDUP = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="voxels per axis of the images (latent: size / 4)")
    parser.add_argument("--batch", type=int, default=2, help="volumes per training batch")
    parser.add_argument("--iterations", type=int, default=10, help="measured training iterations per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training iterations before the measured ones")
    parser.add_argument("--samples", type=int, default=1, help="samples generated together per sampler")
    parser.add_argument(
        "--ddpm-steps", dest="ddpm_steps", type=int, default=DEFAULT_STEPS["ddpm"],
        help="DDPM steps actually run (at most 1000); fewer are extrapolated linearly to 1000",
    )
    parser.add_argument(
        "--samplers", type=str, default=",".join(DEFAULT_STEPS), help="samplers to time, comma separated"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda when available)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: os.cpu_count())")
    # internal: a child process running one measurement on data the parent generated
    parser.add_argument("--_task", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_data_dir", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_scale_factor", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.samplers = tuple(s.strip() for s in args.samplers.split(",") if s.strip())
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail early, with a clear message, on settings the networks cannot run with."""
    if args.iterations < 1 or args.warmup < 0 or args.batch < 1 or args.samples < 1:
        raise SystemExit("--iterations, --batch and --samples must be >= 1 and --warmup >= 0.")
    if not 1 <= args.ddpm_steps <= DEFAULT_STEPS["ddpm"]:
        raise SystemExit(f"--ddpm-steps must be in [1, {DEFAULT_STEPS['ddpm']}].")
    unknown = sorted(set(args.samplers) - set(DEFAULT_STEPS))
    if unknown:
        raise SystemExit(f"--samplers: unknown {unknown}; choose from {sorted(DEFAULT_STEPS)}.")
    # the autoencoder downsamples by 4 and the UNet (3 levels) by 4 more: the latent must be divisible by 4
    if args.size % 16 or args.size < 32:
        raise SystemExit("--size must be a multiple of 16 and >= 32 (latent = size / 4, halved twice by the UNet).")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available.")


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


def training_items(data_dir: str, args: argparse.Namespace) -> list[dict[str, str]]:
    """The datalist's training entries (absolute image paths), as many as the distinct batches use."""
    with open(os.path.join(data_dir, "datalist.json")) as f:
        training = json.load(f)["training"]
    items = [{"image": os.path.join(data_dir, entry["image"])} for entry in training]
    return items[: args.batch * num_distinct_batches(args)]


def load_volume(path: str) -> torch.Tensor:
    """A NIfTI volume as a ``(1, S, S, S)`` float tensor scaled to [0, 1]."""
    import nibabel as nib

    array = torch.from_numpy(nib.load(path).get_fdata(dtype="float32"))
    lo, hi = array.min(), array.max()
    return ((array - lo) / (hi - lo).clamp_min(1e-8))[None]


def load_image(item: dict) -> dict:
    """``encode_items`` transform: load the item's image path into a tensor."""
    return {**item, "image": load_volume(item["image"])}


def cycle(distinct: list[dict], args: argparse.Namespace) -> list[dict]:
    total = args.warmup + args.iterations
    return [distinct[i % len(distinct)] for i in range(total)]


def image_batches(data_dir: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``{"image": (B, 1, S, S, S)}`` batches on ``device`` (``warmup + iterations`` of them, cycled)."""
    volumes = [load_volume(item["image"]) for item in training_items(data_dir, args)]
    distinct = [{"image": torch.stack(volumes[i : i + args.batch]).to(device)}
                for i in range(0, len(volumes), args.batch)]
    return cycle(distinct, args)


def latent_batches(data_dir: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``{"z_mu", "z_sigma": (B, 4, L, L, L)}`` batches of the cached posteriors on ``device``."""
    posteriors = torch.load(os.path.join(data_dir, "latents.pt"), weights_only=True)
    distinct = [
        {key: torch.stack([p[key] for p in posteriors[i : i + args.batch]]).to(device) for key in ("z_mu", "z_sigma")}
        for i in range(0, len(posteriors), args.batch)
    ]
    return cycle(distinct, args)


# --------------------------------------------------------------------------------------------------
# networks (configs/common.json)
# --------------------------------------------------------------------------------------------------
def build_network(net_id: str, seed: int) -> torch.nn.Module:
    """``net_id`` of ``configs/common.json`` at its default sizes, with random weights drawn after
    ``torch.manual_seed(seed)``: the speed does not depend on them."""
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(str(REPO_ROOT / "configs" / "common.json"))
    torch.manual_seed(seed)
    return config.get_parsed_content(net_id)


def build_autoencoder(device: torch.device) -> torch.nn.Module:
    """``autoencoder_def`` (seed 0)."""
    return build_network("autoencoder_def", seed=0).to(device).eval()


def build_unet(device: torch.device) -> torch.nn.Module:
    """``network_def`` (seed 1)."""
    return build_network("network_def", seed=1).to(device)


def build_scheduler(name: str, size: int) -> torch.nn.Module:
    """``schedulers#<name>`` of ``configs/common.json`` (epsilon prediction)."""
    from monai.networks.schedulers import (
        DDIMScheduler,
        DDPMScheduler,
        PNDMScheduler,
        RFlowScheduler,
    )

    beta = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195,
            "prediction_type": "epsilon"}
    if name == "ddpm":
        return DDPMScheduler(**beta, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**beta, clip_sample=False)
    if name == "pndm":
        return PNDMScheduler(**beta, skip_prk_steps=True)
    if name == "rflow":
        return RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, sample_method="logit-normal",
                              use_timestep_transform=True, base_img_size_numel=size**3 // 64, spatial_dim=3)
    raise ValueError(name)


def latent_shape(size: int) -> tuple[int, ...]:
    return (4,) + (size // 4,) * 3


# --------------------------------------------------------------------------------------------------
# child measurements
# --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> dict[str, Any]:
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # KiB on Linux
        "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def summarize(durations: list[tuple[float, float]], args: argparse.Namespace) -> dict[str, Any]:
    measured = [wall for wall, _ in durations[args.warmup :]]
    cpu = sum(c for _, c in durations[args.warmup :])
    mean = statistics.fmean(measured)
    return {
        "iterations": len(measured),
        "mean_s": mean,
        "std_s": statistics.stdev(measured) if len(measured) > 1 else 0.0,
        "it_per_s": 1.0 / mean,
        "cpu_per_wall": cpu / sum(measured),
    }


def measure_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Build the latent cache once (``encode_items``), save it, and return its time and the scale factor."""
    from scripts.latents import encode_items, estimate_scale_factor

    device = torch.device(args.device)
    items = training_items(args._data_dir, args)
    autoencoder = build_autoencoder(device)
    encode_items(autoencoder, items[:1], load_image, device, progress=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    posteriors = encode_items(autoencoder, items, load_image, device, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    torch.save([{"z_mu": p["z_mu"], "z_sigma": p["z_sigma"]} for p in posteriors],
               os.path.join(args._data_dir, "latents.pt"))
    return {"task": "cache", "volumes": len(items), "seconds": seconds,
            "latent_shape": list(posteriors[0]["z_mu"].shape), "scale_factor": estimate_scale_factor(posteriors),
            **memory(device)}


def attach_timer(trainer: Any, device: torch.device) -> list[tuple[float, float]]:
    """Record each iteration's (wall-clock, process CPU) seconds, ITERATION_STARTED -> ITERATION_COMPLETED."""
    from ignite.engine import Events

    durations: list[tuple[float, float]] = []
    started: list[tuple[float, float]] = []

    @trainer.on(Events.ITERATION_STARTED)
    def _start(_: Any) -> None:
        sync(device)
        started.append((time.perf_counter(), time.process_time()))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(_: Any) -> None:
        sync(device)
        wall, cpu = started[-1]
        durations.append((time.perf_counter() - wall, time.process_time() - cpu))

    return durations


def measure_trainer(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """``warmup + iterations`` iterations of ``LatentDiffusionTrainer`` on cached latents or on images."""
    from scripts.engines.diffusion_trainer import LatentDiffusionTrainer
    from scripts.latents import PrepareLatents

    device = torch.device(args.device)
    if variant == "cached":
        batches, prepare = latent_batches(args._data_dir, args, device), PrepareLatents()
    else:
        autoencoder = build_autoencoder(device)
        autoencoder.requires_grad_(False)
        batches, prepare = image_batches(args._data_dir, args, device), PrepareLatents(autoencoder)
    unet = build_unet(device)
    trainer = LatentDiffusionTrainer(
        device=device, max_epochs=1, train_data_loader=batches, network=unet,
        optimizer=torch.optim.AdamW(unet.parameters(), lr=1e-4), noise_scheduler=build_scheduler("ddpm", args.size),
        scale_factor=args._scale_factor, prepare_batch=prepare,
    )
    durations = attach_timer(trainer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    if len(durations) != len(batches):
        raise RuntimeError(f"expected {len(batches)} iterations, timed {len(durations)}.")
    return {"task": variant, **summarize(durations, args), **memory(device)}


def measure_bare(args: argparse.Namespace) -> dict[str, Any]:
    """The ``cached`` maths in a plain PyTorch loop: the engine-free reference."""
    device = torch.device(args.device)
    batches = latent_batches(args._data_dir, args, device)
    unet = build_unet(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = build_scheduler("ddpm", args.size)
    loss_fn = torch.nn.MSELoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for batch in batches:
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        z_mu, z_sigma = batch["z_mu"], batch["z_sigma"]
        latents = (z_mu + z_sigma * torch.randn_like(z_mu)) * args._scale_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
        loss = loss_fn(unet(x=noisy, timesteps=timesteps).float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        sync(device)
        durations.append((time.perf_counter() - wall, time.process_time() - cpu))
    return {"task": "bare", **summarize(durations, args), **memory(device)}


def measure_sampler(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to sample ``--samples`` latents with ``name`` at its default steps and to decode them."""
    from scripts.sampling import decode_latents, initial_noise, sample_generators, sample_latents

    device = torch.device(args.device)
    autoencoder, unet = build_autoencoder(device), build_unet(device).eval()
    scheduler = build_scheduler(name, args.size)
    default_steps = DEFAULT_STEPS[name]
    steps = min(args.ddpm_steps, default_steps) if name == "ddpm" else default_steps
    indices = list(range(args.samples))
    shape = latent_shape(args.size)

    def run(num_steps: int) -> tuple[float, float]:
        noise = initial_noise(shape, indices, seed=0, device=device)
        generators = sample_generators(1, indices, device=noise.device)
        sync(device)
        start = time.perf_counter()
        latents = sample_latents(unet, scheduler, noise, num_steps, generators, progress=False)
        sync(device)
        middle = time.perf_counter()
        images = decode_latents(autoencoder, latents, args._scale_factor).float().cpu()
        sync(device)
        if images.shape[1:] != (1,) + (args.size,) * 3:
            raise RuntimeError(f"decoded shape {tuple(images.shape)} is not (B, 1, {args.size}, ...)")
        return middle - start, time.perf_counter() - middle

    run(2)  # warm-up: first-call allocations and kernel selection, not timed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu0 = time.process_time()
    sample_s, decode_s = run(steps)
    cpu = time.process_time() - cpu0
    per_step = sample_s / steps
    total_sample_s = per_step * default_steps  # == sample_s unless DDPM was capped
    return {
        "task": name, "default_steps": default_steps, "measured_steps": steps, "extrapolated": steps != default_steps,
        "samples": args.samples, "per_step_s": per_step, "sample_s": total_sample_s, "decode_s": decode_s,
        "per_sample_s": (total_sample_s + decode_s) / args.samples, "cpu_per_wall": cpu / (sample_s + decode_s),
        **memory(device),
    }


def run_task(args: argparse.Namespace) -> dict[str, Any]:
    if args._task == "cache":
        return measure_cache(args)
    if args._task in ("cached", "encode"):
        return measure_trainer(args._task, args)
    if args._task == "bare":
        return measure_bare(args)
    if args._task in DEFAULT_STEPS:
        return measure_sampler(args._task, args)
    raise SystemExit(f"unknown task '{args._task}'")


# --------------------------------------------------------------------------------------------------
# parent: generate data, run every measurement in its own subprocess, print the tables
# --------------------------------------------------------------------------------------------------
def child_command(task: str, data_dir: str, args: argparse.Namespace, scale_factor: float) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()),
        "--size", str(args.size), "--batch", str(args.batch),
        "--iterations", str(args.iterations), "--warmup", str(args.warmup),
        "--samples", str(args.samples), "--ddpm-steps", str(args.ddpm_steps),
        "--device", args.device, "--threads", str(args.threads),
        "--_task", task, "--_data_dir", data_dir, "--_scale_factor", repr(scale_factor),
    ]  # fmt: skip


def run_child(task: str, data_dir: str, args: argparse.Namespace, scale_factor: float = 1.0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return the JSON line it printed last."""
    start = time.perf_counter()
    proc = subprocess.run(child_command(task, data_dir, args, scale_factor), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measurement '{task}' failed (exit {proc.returncode}); its error is printed above.")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            print(f"  {task}: done in {time.perf_counter() - start:.0f} s", flush=True)
            return result
    raise SystemExit(f"measurement '{task}' printed no result line:\n{proc.stdout}")


def memory_columns(r: dict[str, Any], cuda: bool) -> str:
    return f" {r['peak_rss_mib']:>13.1f}" + (f" {r['peak_cuda_mib']:>14.1f}" if cuda else "")


def memory_header(cuda: bool) -> str:
    return f" {'peak RSS MiB':>13}" + (f" {'peak CUDA MiB':>14}" if cuda else "")


def format_training(results: dict[str, dict[str, Any]], cache: dict[str, Any], args: argparse.Namespace) -> str:
    cuda = args.device == "cuda"
    labels = {
        "cached": "engine, cached latents (PrepareLatents())",
        "encode": "engine, encode every iteration (PrepareLatents(ae))",
        "bare": "plain PyTorch loop, cached latents",
    }
    header = (f"{'variant':<7} {'what':<51} {'it/s':>7} {'s/iter (mean ± std)':>20} {'CPU/wall':>8}"
              + memory_header(cuda))
    lines = [header, "-" * len(header)]
    for name in TRAIN_VARIANTS:
        r = results[name]
        timing = f"{r['mean_s']:.3f} ± {r['std_s']:.3f}"
        lines.append(f"{name:<7} {labels[name]:<51} {r['it_per_s']:>7.2f} {timing:>20} {r['cpu_per_wall']:>8.2f}"
                     + memory_columns(r, cuda))
    cached, encode, bare = results["cached"], results["encode"], results["bare"]
    speedup = cached["it_per_s"] / encode["it_per_s"]
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    lines += [
        "",
        f"speed-up cached / encode (it/s): {speedup:.2f}x   (target >= {TARGET_SPEEDUP:.0f}x at 64^3 image / "
        f"16^3 latent, batch 2: {verdict})",
        f"engine overhead: bare / cached (it/s) = {bare['it_per_s'] / cached['it_per_s']:.2f}x "
        f"({(cached['mean_s'] - bare['mean_s']) * 1000:+.1f} ms per iteration)",
        f"peak RSS ratio cached / encode: {cached['peak_rss_mib'] / encode['peak_rss_mib']:.2f}",
    ]
    if cuda:
        lines.append(f"peak CUDA memory ratio cached / encode: {cached['peak_cuda_mib'] / encode['peak_cuda_mib']:.2f}")
    saved = encode["mean_s"] - cached["mean_s"]
    breakeven = f"; pays for itself after {cache['seconds'] / saved:.1f} iterations" if saved > 0 else ""
    lines.append(
        f"one-time latent cache: encode_items over {cache['volumes']} volumes took {cache['seconds']:.2f} s "
        f"({cache['seconds'] / cache['volumes']:.3f} s/volume, peak RSS {cache['peak_rss_mib']:.1f} MiB){breakeven}"
    )
    return "\n".join(lines)


def format_sampling(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    cuda = args.device == "cuda"
    header = (f"{'sampler':<7} {'steps':>5} {'measured':>8} {'s/step':>8} {'sampling s':>10} {'decode s':>8} "
              f"{'s/sample':>9} {'CPU/wall':>8}" + memory_header(cuda))
    lines = [header, "-" * len(header)]
    notes = []
    for name, r in results.items():
        mark = "*" if r["extrapolated"] else ""
        lines.append(
            f"{name:<7} {r['default_steps']:>5} {r['measured_steps']:>8} {r['per_step_s']:>8.4f} "
            f"{r['sample_s']:>10.2f} {r['decode_s']:>8.2f} {r['per_sample_s']:>8.2f}{mark or ' '} "
            f"{r['cpu_per_wall']:>8.2f}"
            + memory_columns(r, cuda)
        )
        if r["extrapolated"]:
            notes.append(f"* {name}: EXTRAPOLATED linearly from {r['measured_steps']} measured steps to "
                         f"{r['default_steps']} (sampling s = s/step x {r['default_steps']}; decode measured)")
    return "\n".join(lines + ([""] + notes if notes else []))


def warn_if_busy(threads: int) -> None:
    """Say so when other processes already load the CPU: the timings would then measure them too."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if load > 0.5 * threads:
        print(f"note: 1-minute load average is {load:.2f} on {threads} threads; other processes may skew timings")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    if args._task is not None:
        print(json.dumps(run_task(args)), flush=True)
        return

    import monai

    print(
        f"stage-2 speed: image {args.size}^3 -> latent {list(latent_shape(args.size))}, batch {args.batch}, "
        f"{args.warmup} warm-up + {args.iterations} measured iterations, {args.samples} sample(s) per sampler, "
        f"device {args.device}, {args.threads} threads (torch {torch.__version__}, monai {monai.__version__})",
        flush=True,
    )
    warn_if_busy(args.threads)
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage2_speed_") as data_dir:
        generate_data(data_dir, args)
        cache = run_child("cache", data_dir, args)
        scale = cache["scale_factor"]
        training = {name: run_child(name, data_dir, args, scale) for name in TRAIN_VARIANTS}
        sampling = {name: run_child(name, data_dir, args, scale) for name in args.samplers}
    print()
    print(f"1. diffusion training (LatentDiffusionTrainer, DDPM, AdamW lr 1e-4; scale factor {scale:.4f})")
    print(format_training(training, cache, args))
    if sampling:
        print()
        print(f"2. generation: sample_latents + decode_latents, {args.samples} sample(s) together, random weights, "
              f"default steps of configs/inference.json")
        print(format_sampling(sampling, args))
    print()
    starved = [name for name, r in {**training, **sampling}.items()
               if args.device == "cpu" and r["cpu_per_wall"] < 0.75 * args.threads]
    if starved:
        print(f"WARNING: CPU/wall below 0.75 x {args.threads} threads for {', '.join(starved)}: other processes (or a "
              "CPU quota) took cores during these measurements; their timings are inflated and the ratios unreliable.")
    print(f"total benchmark time {time.perf_counter() - total_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
