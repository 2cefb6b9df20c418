"""Handlers that keep schedules in step with training: the learning-rate schedule advanced once per optimiser step,
and the epoch told to the stage-2 objective, which keys each item's random draws by it
(:class:`scripts.diffusion.LatentDiffusionPrepareBatch`, ``sample_seed``), as ``DistributedSampler.set_epoch`` is."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import LrScheduleHandler

__all__ = ["OptimizerStepLrSchedule", "SetEpoch"]


class OptimizerStepLrSchedule(LrScheduleHandler):
    """MONAI's iteration-level ``LrScheduleHandler``, advanced at ``IterationEvents.MODEL_COMPLETED``, which the
    bundle's trainers fire after each optimiser step, instead of after every iteration: with gradient accumulation a
    warm-up of ``n`` steps then lasts ``n`` optimiser steps, as it does without it (the same learning rate at every
    step, so ``k`` accumulated steps equal a ``k`` times larger batch). Arguments: MONAI's, without ``epoch_level``.
    """

    def __init__(self, lr_scheduler: Any, print_lr: bool = True, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(lr_scheduler, print_lr=print_lr, name=name, epoch_level=False, **kwargs)

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)


class SetEpoch:
    """At each ``EPOCH_STARTED`` (a resumed epoch included) calls ``target.set_epoch(engine.state.epoch)``.

    Args:
        target: any object with a ``set_epoch(epoch)`` method, e.g. the trainer's ``prepare_batch``.
    """

    def __init__(self, target: Any) -> None:
        if not callable(getattr(target, "set_epoch", None)):
            raise TypeError(f"SetEpoch needs an object with a set_epoch(epoch) method, got {type(target).__name__}.")
        self.target = target

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.target.set_epoch(engine.state.epoch)
