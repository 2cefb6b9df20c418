"""Whole-training-state checkpoints: save every N epochs and at the end (atomically), resume from the last one."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.networks import unwrap
from scripts.storage import atomic_save, load_checkpoint

__all__ = ["TrainingCheckpoint", "is_main_process"]

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True on rank 0 of a distributed run, and always when not distributed."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


class TrainingCheckpoint:
    """Save and restore everything a run needs to continue: networks, optimisers, LR schedulers, grad scalers,
    EMA weights and the engine's epoch and iteration counts.

    Files (all written with a temporary name then renamed, on rank 0 only):
        - ``save_dir/filename``: the full training state, updated every ``save_interval`` epochs and at the end;
        - ``save_dir/<weights[name]>``: plain state dicts of selected modules (e.g. ``model_autoencoder.pt``),
          the stable names inference configs read, updated at the same moments.

    Args:
        save_dir: folder of the checkpoint files.
        save_dict: name -> object with ``state_dict()``/``load_state_dict()`` (networks, optimisers, schedulers).
            The engine's own state and its grad scalers are added automatically.
        filename: name of the full-state checkpoint.
        save_interval: epochs between saves; 0 saves only at the end.
        weights: name in ``save_dict`` -> file name of a plain state dict written beside the checkpoint.
        resume: ``False``; ``True`` to continue from ``save_dir/filename``; or the path of a checkpoint.
        extra: constant values stored in every checkpoint (e.g. the latent scale factor).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint.pt",
        save_interval: int = 1,
        weights: Mapping[str, str] | None = None,
        resume: bool | str = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.filename = filename
        self.save_interval = int(save_interval)
        self.weights = dict(weights or {})
        unknown = [k for k in self.weights if k not in self.save_dict]
        if unknown:
            raise KeyError(f"weights names {unknown} are not in save_dict {sorted(self.save_dict)}.")
        # command-line overrides arrive as text: "--resume true" means True, not a file named "true"
        if isinstance(resume, str) and resume.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
            resume = resume.strip().lower() in ("true", "1", "yes")
        self.resume = resume
        self.extra = dict(extra or {})
        self._last_saved_iteration = -1

    @property
    def path(self) -> Path:
        return self.save_dir / self.filename

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objects = dict(self.save_dict)
        steps = getattr(engine, "optimizer_steps", None)
        if callable(steps):
            objects.update(steps())
        return objects

    def save(self, engine: Engine) -> None:
        """Write the checkpoint and the plain weight files (rank 0 only; once per iteration count)."""
        if not is_main_process() or engine.state.iteration == self._last_saved_iteration:
            return
        state = {name: unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()
                 for name, obj in self._objects(engine).items()}
        state["engine"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                           "epoch_length": engine.state.epoch_length}
        state.update(self.extra)
        atomic_save(state, self.path)
        for name, fname in self.weights.items():
            atomic_save(state[name], self.save_dir / fname)
        self._last_saved_iteration = engine.state.iteration
        logger.info(f"saved checkpoint {self.path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})")

    def resume_path(self) -> Path:
        """The checkpoint ``resume`` points at."""
        return self.path if self.resume is True else Path(str(self.resume))

    def load(self, engine: Engine) -> None:
        """Restore every object and the epoch/iteration counts; the configured ``max_epochs`` is kept."""
        path = self.resume_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"resume: no checkpoint at '{path}'. Train without resume first, or pass resume=<checkpoint path>."
            )
        state = load_checkpoint(path, map_location=engine.state.device if hasattr(engine.state, "device") else "cpu",
                                what="resume checkpoint")
        objects = self._objects(engine)
        missing = [k for k in objects if k not in state]
        if missing or "engine" not in state:
            raise ValueError(
                f"resume checkpoint '{path}' lacks {missing or ['engine']}: it was written by another workflow. "
                "Resume with the config that wrote it."
            )
        for name, obj in objects.items():
            try:
                (unwrap(obj) if isinstance(obj, torch.nn.Module) else obj).load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(
                    f"resume checkpoint '{path}': '{name}' does not match the config ({str(e).splitlines()[0]}). "
                    "Resume with the config that wrote it."
                ) from e
        done = state["engine"]
        if done["epoch"] >= engine.state.max_epochs:
            raise ValueError(
                f"resume checkpoint '{path}' already finished epoch {done['epoch']} of max_epochs="
                f"{engine.state.max_epochs}; raise train#trainer#max_epochs to train further."
            )
        engine.state.iteration = int(done["iteration"])
        engine.state.epoch = int(done["epoch"])
        self._last_saved_iteration = engine.state.iteration
        if is_main_process():
            print(f"resumed from {path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}")
