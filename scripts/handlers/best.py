"""The best model so far by the validation key metric, written atomically, with a score that survives resume."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn

from scripts.distributed import is_main_rank, unwrap
from scripts.storage import atomic_save, remove_stale_temporaries

__all__ = ["BestWeights"]

logger = logging.getLogger(__name__)


class BestWeights:
    """Validation handler: after each validation round, write the plain state dict of ``network`` to
    ``save_dir/filename`` (atomically, on rank 0) when the evaluator's key metric beats the best so far, compared
    with the evaluator's own ``metric_cmp_fn`` (higher PSNR in stage 1, lower loss in stage 2).

    It replaces MONAI's ``CheckpointSaver(save_key_metric=True)``, which deletes the old file before writing the
    new one and forgets its best score when a run is resumed. Put this object in the training checkpoint's
    ``save_dict``: its ``state_dict`` is the best score and epoch, restored on resume, so the first validation of a
    resumed run replaces the file only if it beats the score of the interrupted run. The restored score is also
    given to the evaluator (``state.best_metric``), whose log line then reports the best of the whole run.

    Args:
        save_dir: folder of the file.
        network: the network whose weights are kept (a DDP wrapper is unwrapped).
        filename: e.g. ``model_autoencoder_best.pt``.
        key_metric_name: the metric to compare; default the evaluator's key metric.
    """

    #: a resume checkpoint written before this handler existed lacks its state; the score then starts afresh
    optional_in_checkpoint = True

    def __init__(self, save_dir: str, network: nn.Module, filename: str, key_metric_name: str | None = None) -> None:
        self.path = Path(save_dir) / filename
        self.network = network
        self.key_metric_name = key_metric_name
        self.best_score: float | None = None
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        if is_main_rank():
            for tmp in remove_stale_temporaries(self.path):
                logger.warning(f"removed '{tmp}', left by a run killed while writing '{self.path.name}'")
        engine.add_event_handler(Events.STARTED, self._share_best)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save_if_better)

    def _share_best(self, engine: Engine) -> None:
        if self.best_score is not None and getattr(engine.state, "best_metric_epoch", -1) == -1:
            engine.state.best_metric = self.best_score
            engine.state.best_metric_epoch = self.best_epoch

    def _save_if_better(self, engine: Engine) -> None:
        name = self.key_metric_name or engine.state.key_metric_name
        score = float(engine.state.metrics[name])
        if self.best_score is not None and not engine.metric_cmp_fn(score, self.best_score):
            return
        self.best_score, self.best_epoch = score, int(engine.state.epoch)
        if is_main_rank():
            atomic_save(unwrap(self.network).state_dict(), self.path)
            logger.info(f"saved {self.path} ({name} {score:.6g} at epoch {self.best_epoch})")

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        score = state.get("best_score")
        self.best_score = None if score is None else float(score)
        self.best_epoch = int(state.get("best_epoch", -1))
