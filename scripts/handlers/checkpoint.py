"""Whole-training-state checkpoints: save every N epochs and at the end (atomically), resume from the last one."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.distributed import any_rank, gather_object, is_main_rank, rank, unwrap, world_size
from scripts.randomness import RandomStates
from scripts.records import RECORD_FILENAME
from scripts.storage import atomic_save, atomic_write_json, file_sha256, load_checkpoint, remove_stale_temporaries

__all__ = ["TrainingCheckpoint"]

logger = logging.getLogger(__name__)


def _plain_weights(obj: object, state: dict) -> dict:
    """The plain network state dict of a weights entry: a wrapper that averages a network (``EMA``) keeps its
    own bookkeeping in its checkpoint state, but its weight file holds only the averaged network's weights."""
    module = getattr(obj, "module", None)
    if not isinstance(obj, torch.nn.Module) and isinstance(module, torch.nn.Module):
        return module.state_dict()
    return state


#: key of the random states in the checkpoint: one :class:`scripts.randomness.RandomStates` state per rank
RNG_KEY = "rng"


class TrainingCheckpoint:
    """Save and restore everything a run needs to continue: networks, optimisers, LR schedulers, grad scalers,
    EMA weights, the best-model score (a :class:`BestWeights` in ``save_dict``), the random states of every rank
    (generators and the training data's random transforms) and the engine's epoch and iteration counts, so that
    a run stopped after an epoch and resumed computes what an uninterrupted run computes.

    Files (all written with a temporary name then renamed, on rank 0 only):
        - ``save_dir/filename``: the full training state, updated every ``save_interval`` epochs and at the end;
        - ``save_dir/<weights[name]>``: plain state dicts of selected modules (e.g. ``model_autoencoder.pt``),
          the stable names inference configs read, updated at the same moments;
        - ``save_dir/record_filename``: the training record (see :mod:`scripts.records`) as JSON, with the epoch,
          the iteration and the sha256 of each weight file written with it; also in the checkpoint as ``record``.

    A run killed while writing leaves the previous complete files (and a temporary file, removed when the next run
    attaches this handler).

    Args:
        save_dir: folder of the checkpoint files.
        save_dict: name -> object with ``state_dict()``/``load_state_dict()`` (networks, optimisers, schedulers).
            The engine's own state and its grad scalers are added automatically.
        filename: name of the full-state checkpoint.
        save_interval: epochs between saves; 0 saves only at the end.
        weights: name in ``save_dict`` -> file name of a plain state dict written beside the checkpoint.
        resume: ``False``; ``True`` to continue from ``save_dir/filename``; or the path of a checkpoint.
        record: what inference must know about this training (e.g. the latent scale factor, the noise schedule),
            JSON-able; ``None`` writes no record.
        record_filename: name of the record's JSON file beside the weights.
        save_on_signals: signal names (default ``SIGTERM``, ``SIGUSR1``: cluster preemption and SLURM's
            ``--signal`` warning) that save a checkpoint at the end of the current iteration and stop training,
            on every rank at the same iteration; ``--resume true`` then continues mid-epoch. Empty to disable.

    A checkpoint written mid-epoch records the completed epochs and the iteration, so a resumed run finishes the
    interrupted epoch with its remaining iterations (their batches are drawn afresh).
    """

    #: the signal number that stopped the last run of this process, or ``None`` (read by ``main.py``)
    stopped_by: int | None = None

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint.pt",
        save_interval: int = 1,
        weights: Mapping[str, str] | None = None,
        resume: bool | str = False,
        record: Mapping[str, Any] | None = None,
        record_filename: str = RECORD_FILENAME,
        save_on_signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.filename = filename
        self.save_interval = int(save_interval)
        self.weights = dict(weights or {})
        unknown = [k for k in self.weights if k not in self.save_dict]
        if unknown:
            raise KeyError(f"weights names {unknown} are not in save_dict {sorted(self.save_dict)}.")
        self.resume = resume  # "--resume true" arrives as True (scripts.checks.typed_overrides)
        self.record = dict(record) if record is not None else None
        self.record_filename = record_filename
        unknown_signals = [name for name in save_on_signals if not hasattr(signal, name)]
        if unknown_signals:
            raise ValueError(f"save_on_signals: {unknown_signals} are not signals on this system.")
        self.save_on_signals = list(save_on_signals)
        self._last_saved_iteration = -1
        self._received: int | None = None

    @property
    def path(self) -> Path:
        return self.save_dir / self.filename

    def attach(self, engine: Engine) -> None:
        if is_main_rank():
            for fname in (self.filename, *self.weights.values(), self.record_filename):
                for tmp in remove_stale_temporaries(self.save_dir / fname):
                    logger.warning(f"removed '{tmp}', left by a run killed while writing '{fname}'")
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)
        if self.save_on_signals and threading.current_thread() is threading.main_thread():
            for name in self.save_on_signals:
                signal.signal(getattr(signal, name), self._on_signal)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_signalled)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # only note it: the checkpoint is written between iterations, never in the middle of an update
        self._received = signum

    def _stop_if_signalled(self, engine: Engine) -> None:
        if not any_rank(self._received is not None, getattr(engine.state, "device", "cpu")):
            return
        self.save(engine)
        name = signal.Signals(self._received).name if self._received else "a signal on another rank"
        TrainingCheckpoint.stopped_by = self._received or signal.SIGTERM
        if is_main_rank():
            print(f"stopped by {name} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; checkpoint "
                  f"saved to {self.path}. Continue with --resume true (or main.py --resume <run folder>).", flush=True)
        engine.terminate()

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objects = dict(self.save_dict)
        steps = getattr(engine, "optimizer_steps", None)
        if callable(steps):
            objects.update(steps())
        return objects

    def save(self, engine: Engine) -> None:
        """Write the checkpoint and the plain weight files (rank 0 only, with every rank's random states; once per
        iteration count). Every rank calls it at the same events."""
        if engine.state.iteration == self._last_saved_iteration:
            return
        self._last_saved_iteration = engine.state.iteration
        random_states = gather_object(RandomStates(getattr(engine, "data_loader", None)).state_dict())
        if not is_main_rank():
            return
        state = {name: unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()
                 for name, obj in self._objects(engine).items()}
        length = engine.state.epoch_length
        mid_epoch = bool(length) and engine.state.iteration % length != 0
        state["engine"] = {"epoch": engine.state.epoch - 1 if mid_epoch else engine.state.epoch,  # completed epochs
                           "iteration": engine.state.iteration, "epoch_length": length}
        state[RNG_KEY] = random_states
        if self.record is not None:
            state["record"] = self.record
        atomic_save(state, self.path)
        for name, fname in self.weights.items():
            atomic_save(_plain_weights(self.save_dict[name], state[name]), self.save_dir / fname)
        if self.record is not None:
            written = {fname: file_sha256(self.save_dir / fname) for fname in self.weights.values()}
            atomic_write_json({**self.record, **state["engine"], "weights_sha256": written},
                              self.save_dir / self.record_filename)
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
        # an object that a checkpoint of an earlier version lacks (the best-model score) starts afresh
        missing = [k for k in objects if k not in state and not getattr(objects[k], "optional_in_checkpoint", False)]
        if missing or "engine" not in state:
            raise ValueError(
                f"resume checkpoint '{path}' lacks {missing or ['engine']}: it was written by another workflow. "
                "Resume with the config that wrote it."
            )
        for name, obj in objects.items():
            if name not in state:
                continue
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
        randomness = self._restore_random_states(engine, state.get(RNG_KEY))
        if is_main_rank():
            print(f"resumed from {path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}{randomness}",
                  flush=True)

    def _restore_random_states(self, engine: Engine, states: list | None) -> str:
        """Restore this rank's random states; the words the resume line ends with when they cannot be."""
        if not states:
            return " (the checkpoint holds no random states: the run continues with fresh random draws)"
        if len(states) != world_size():
            return (f" (random states of {len(states)} processes, this run has {world_size()}: the run continues "
                    "with fresh random draws)")
        try:
            RandomStates(getattr(engine, "data_loader", None)).load_state_dict(states[rank()])
        except (ValueError, KeyError, TypeError) as e:
            return f" (random states not restored: {e}; the run continues with fresh random draws)"
        return ""
