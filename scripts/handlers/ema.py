"""Exponential moving average of a network's weights, updated after each optimiser step."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.networks import unwrap

__all__ = ["EMA", "EMAUpdate"]


class EMA:
    """Keeps ``module``, an EMA copy of ``network``: ``ema = decay * ema + (1 - decay) * weights`` at each
    :meth:`update` (buffers are copied); :class:`EMAUpdate` calls it after every optimiser step. Its ``state_dict``
    is the copy's plain state dict, so it is saved as ``model_ema.pt`` beside the raw weights and loads into the
    network definition directly.

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        decay: EMA decay per optimiser step; e.g. 0.999 averages over roughly the last 1000 steps.
    """

    def __init__(self, network: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")
        self.network = network
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the network's current weights."""
        source = unwrap(self.network)
        for ema_p, p in zip(self.module.parameters(), source.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), source.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.module.load_state_dict(state)


class EMAUpdate:
    """Training handler: one :meth:`EMA.update` after every optimiser step (every iteration that ends a
    gradient-accumulation window, as the trainer's ``is_step_iteration`` tells; every iteration otherwise).

    The averaged weights live in the :class:`EMA` object, which validation and checkpoints reference; this handler
    only schedules its updates, so that ``train#handlers`` holds handler definitions alone.

    Args:
        ema: the EMA to update.
    """

    def __init__(self, ema: EMA) -> None:
        self.ema = ema

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_update)

    def _maybe_update(self, engine: Engine) -> None:
        is_step = getattr(engine, "is_step_iteration", None)
        if is_step is None or is_step():
            self.ema.update()
