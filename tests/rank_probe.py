"""A test-only handler: records which volumes each rank trained on, to check that DDP ranks see disjoint data."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ignite.engine import Engine, Events


class SeenItems:
    """Writes ``<folder>/rank<r>.json``: the file names of every training batch this rank drew."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.seen: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _record(self, engine: Engine) -> None:
        names = engine.state.batch["image"].meta["filename_or_obj"]
        self.seen.extend(os.path.basename(str(n)) for n in names)

    def _write(self, engine: Engine) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        (self.folder / f"rank{rank}.json").write_text(json.dumps({"epochs": engine.state.epoch, "seen": self.seen}))


class PosteriorMean:
    """A test-only handler: the autoencoder decodes its posterior mean instead of a sample of it, so that a run's
    result does not depend on which rank draws which reparameterisation noise (each rank draws its own, which no
    other world size reproduces)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._use_the_mean)  # the trainer holds its networks by then

    def _use_the_mean(self, engine: Engine) -> None:
        from scripts.distributed import unwrap

        unwrap(engine.g_network).sampling = lambda z_mu, z_sigma: z_mu
