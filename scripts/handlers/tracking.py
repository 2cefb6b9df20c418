"""Experiment tracking with ``monai.bundle run --tracking mlflow``: make MONAI's default MLflow handler read our
trainers' outputs.

MONAI's default tracking settings attach an ``MLFlowHandler`` to ``train#trainer`` whose output transform,
``from_engine(['loss'], first=True)``, expects the decollated list output of MONAI's own trainers. Our trainers
return one dict per iteration (``decollate=False``) with every loss term under ``"losses"``; for them the handler
logs those terms instead (``train_recon``, ``train_kl``, ``train_g_loss``, ... or ``train_diffusion``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.utils import optional_import

MLFlowHandler, _has_handler = optional_import("monai.handlers", name="MLFlowHandler")

__all__ = ["LossTermsForTracking", "adapt_tracking_handlers"]


class LossTermsForTracking:
    """Output transform: the wrapped transform's value, or the iteration's loss terms where that value is not a
    number or a dict (MONAI's default transform gives a tuple for a dict output).

    Args:
        transform: the handler's original output transform.
        prefix: put before each loss term's name, e.g. ``"train_"``.
    """

    def __init__(self, transform: Callable[[Any], Any], prefix: str = "train_") -> None:
        self.transform = transform
        self.prefix = prefix

    def __call__(self, output: Any) -> Any:
        value = self.transform(output)
        if isinstance(value, tuple) and isinstance(output, Mapping) and "losses" in output:
            return {f"{self.prefix}{k}": float(v) for k, v in output["losses"].items()}
        return value


def adapt_tracking_handlers(handlers: Sequence | None) -> list:
    """The trainer's handlers, with each ``MLFlowHandler``'s output transform wrapped in
    :class:`LossTermsForTracking`."""
    handlers = list(handlers or [])
    if not _has_handler:
        return handlers
    for handler in handlers:
        if isinstance(handler, MLFlowHandler) and not isinstance(handler.output_transform, LossTermsForTracking):
            handler.output_transform = LossTermsForTracking(handler.output_transform)
    return handlers
