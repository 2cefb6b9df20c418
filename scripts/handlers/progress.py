"""A console progress bar for the engines (Ignite's tqdm bar, attachable from a config)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

from scripts.distributed import is_main_rank

__all__ = ["ProgressBar"]


class ProgressBar:
    """tqdm progress bar with the iteration's losses; silent on ranks other than 0.

    Args:
        output_transform: ``engine.state.output -> {name: float}`` shown beside the bar.
        desc: text before the bar.
    """

    def __init__(self, output_transform: Callable[[Any], dict[str, float]] | None = None, desc: str = "") -> None:
        self.output_transform = output_transform
        self.desc = desc

    def attach(self, engine: Engine) -> None:
        if not is_main_rank():
            return
        bar = _IgniteProgressBar(persist=False, desc=self.desc or None, ncols=100)
        bar.attach(engine, output_transform=self.output_transform)
