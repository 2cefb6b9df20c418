"""Exponential moving average of a network's weights, updated after each optimiser step."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch import nn

from scripts.distributed import unwrap

__all__ = ["EMA", "EMAUpdate", "NUM_UPDATES_KEY"]

#: key of the update count in the EMA's checkpoint state (its weight file holds only the averaged network's weights)
NUM_UPDATES_KEY = "ema_num_updates"


class EMA:
    """Keeps ``module``, an EMA copy of ``network``: ``ema = d * ema + (1 - d) * weights`` at each :meth:`update`
    (buffers are copied); :class:`EMAUpdate` calls it after every optimiser step. ``model_ema.pt`` holds the copy's
    plain state dict, so it loads into the network definition directly.

    With ``warmup`` (default on) the decay of step ``n`` is ``min(decay, (1 + n) / (10 + n))`` (the warm-up of
    TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``, as used by CompVis latent-diffusion's
    ``LitEma``), so short runs do not keep a share of the random initial weights: after ``n`` steps at a fixed
    0.995 that share is ``0.995 ** n`` (2 % after 800 steps), with the warm-up it is below ``10 / (10 + n)``
    times the last weights' drift.

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        decay: largest EMA decay per optimiser step; e.g. 0.999 averages over roughly the last 1000 steps.
        warmup: ramp the decay up from 0.1 over the first steps.
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")
        self.network = network
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the network's current weights."""
        source = unwrap(self.network)
        decay = self.current_decay()
        self.num_updates += 1
        for ema_p, p in zip(self.module.parameters(), source.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), source.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        """The averaged network's state dict, plus the update count (``ema_num_updates``) for exact resume."""
        return {**self.module.state_dict(), NUM_UPDATES_KEY: torch.tensor(self.num_updates)}

    def load_state_dict(self, state: Mapping) -> None:
        state = dict(state)
        self.num_updates = int(state.pop(NUM_UPDATES_KEY, 0))
        self.module.load_state_dict(state)


class EMAUpdate:
    """Training handler: one :meth:`EMA.update` after every optimiser step, on MONAI's
    ``IterationEvents.MODEL_COMPLETED``, which the bundle's trainers fire after each optimiser step (the iterations
    that end a gradient-accumulation window).

    The averaged weights live in the :class:`EMA` object, which validation and checkpoints reference; this handler
    only schedules its updates, so that ``train#handlers`` holds handler definitions alone.

    Args:
        ema: the EMA to update.
    """

    def __init__(self, ema: EMA) -> None:
        self.ema = ema

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._update)

    def _update(self, engine: Engine) -> None:
        self.ema.update()
