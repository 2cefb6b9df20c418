"""Distributed data-parallel training under ``torchrun``: rank facts, process group, DDP (un)wrapping, lr scaling.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` before our code runs, so every function here can
answer from the environment before the process group exists (config expressions are evaluated lazily, some before
``init_process_group`` runs). Without ``torchrun`` the run is one process of rank 0 in a world of size 1.
The multi-GPU overlays (``configs/multi_gpu_train_*.json``) wire these functions; the single-process configs use
only :func:`is_main_rank`, :func:`print_main` and :func:`scaled_lr`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "any_rank",
    "barrier",
    "broadcast_float",
    "broadcast_object",
    "destroy_process_group",
    "gather_object",
    "init_process_group",
    "is_distributed",
    "is_main_rank",
    "local_device",
    "print_main",
    "rank",
    "scaled_lr",
    "unwrap",
    "world_size",
    "wrap_ddp",
]


def is_distributed() -> bool:
    """Whether a process group is initialised (``torch.distributed``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank: from the process group when it exists, else ``$RANK`` (0 without torchrun)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes: from the process group when it exists, else ``$WORLD_SIZE`` (1 without torchrun)."""
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    """True on rank 0, the only rank that writes checkpoints, logs, PNGs and caches."""
    return rank() == 0


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only (configs use it for their start and end summaries)."""
    if is_main_rank():
        print(*args, **kwargs, flush=True)


def local_device() -> torch.device:
    """This process's device: ``cuda:$LOCAL_RANK`` (made current) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_process_group(backend: str = "auto", timeout_minutes: float = 30.0) -> str:
    """Join the ``torchrun`` process group (idempotent) and return the backend used.

    Args:
        backend: ``"auto"`` picks NCCL when CUDA is available and Gloo otherwise; or ``"nccl"``/``"gloo"``.
        timeout_minutes: how long a collective waits for the other ranks (e.g. while rank 0 encodes the
            latent cache) before failing.

    Raises:
        RuntimeError: when the process was not started by ``torchrun`` (no ``RANK``/``WORLD_SIZE``), naming the fix.
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if is_distributed():
        return dist.get_backend()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "the multi-GPU overlay needs torchrun: start it as `torchrun --nproc_per_node=N -m monai.bundle run "
            "--config_file \"['configs/common.json','configs/train_autoencoder.json',"
            "'configs/multi_gpu_train_autoencoder.json']\"`, "
            "or drop configs/multi_gpu_*.json for a single process."
        )
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return backend


def destroy_process_group() -> None:
    """Leave the process group if one exists (the overlays' ``finalize``), after a barrier: a rank that tears the
    group down while another still talks to it (rank 0 also hosts the rendezvous store) can abort the other at
    exit."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(network: nn.Module, device: torch.device | str, find_unused_parameters: bool = False) -> nn.Module:
    """``network`` wrapped in ``DistributedDataParallel`` (``device_ids`` only on CUDA), or unchanged in a
    one-process run. Rank 0's weights are broadcast to every rank when the wrapper is built."""
    if not is_distributed() or world_size() == 1:
        return network
    device = torch.device(device)
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        network.to(device), device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside a ``DistributedDataParallel``/``DataParallel``/compiled wrapper."""
    while hasattr(network, "module") and isinstance(network.module, nn.Module):
        network = network.module
    return getattr(network, "_orig_mod", network)


def scaled_lr(base_learning_rate: float, batch_size: int, accumulation_steps: int = 1, scale: bool = True,
              name: str = "lr") -> float:
    """The learning rate of a run, scaled as in latent diffusion (Rombach et al. 2022, ``main.py``):
    ``lr = base_learning_rate x world size x batch size x gradient-accumulation steps``, or ``base_learning_rate``
    unchanged when ``scale`` is false. Printed once, on rank 0, with each factor, so it is never changed silently.

    Args:
        base_learning_rate: learning rate per sample (``scale=True``) or the learning rate itself.
        batch_size: per-process batch size.
        accumulation_steps: iterations accumulated per optimiser step.
        scale: apply the scaling.
        name: the config id, used in the printed line.
    """
    if not scale:
        print_main(f"{name} = base_learning_rate {base_learning_rate:.3e} (scale_lr false: not scaled)")
        return float(base_learning_rate)
    n = world_size()
    lr = float(base_learning_rate) * n * int(batch_size) * int(accumulation_steps)
    print_main(
        f"{name} = {lr:.3e} = base_learning_rate {base_learning_rate:.3e} x world size {n} x batch size "
        f"{int(batch_size)} x gradient accumulation {int(accumulation_steps)} (scale_lr false to use it unscaled)"
    )
    return lr


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank (unchanged without a process group)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(value: Any) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank (``[value]`` without a process
    group)."""
    if not is_distributed():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_float(value: float) -> float:
    """Rank 0's ``value`` on every rank, as a float (the latent scale factor)."""
    return float(broadcast_object(float(value)))


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on at least one rank (a collective every rank must call; ``flag`` alone without one)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0.0)
