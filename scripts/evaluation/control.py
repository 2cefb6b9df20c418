"""The control check of conditional generation: each sample's requested value beside the value measured on it.

For the demo the measure is :func:`scripts.evaluation.known_truth.estimate_quantities` (lesion count, ventricle,
brain and head volume of a phantom-like volume), wired in ``configs/inference_conditional.json``; for other data any
``measure(volume, spacing) -> {quantity: value}`` can be wired instead, or the check switched off with
``control_quantities`` ``{}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ControlCheck", "control_summary"]


class ControlCheck:
    """Measures generated volumes for the conditions that have a measure.

    Args:
        measure: ``(volume (*spatial) numpy, image space, spacing) -> {quantity: value}``.
        quantities: condition name -> the measured quantity that checks it (e.g. ``lesion_count`` ->
            ``lesion_count``); conditions not named are not checked.
    """

    def __init__(self, measure: Callable[..., Mapping[str, float]], quantities: Mapping[str, str]) -> None:
        self.measure = measure
        self.quantities = dict(quantities)

    def __call__(self, volume: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
        """The measured value of each checked condition, for one volume ``(C, *spatial)`` or ``(*spatial)``."""
        if not self.quantities:
            return {}
        volume = np.asarray(volume)
        measured = self.measure(volume[0] if volume.ndim == len(spacing) + 1 else volume, spacing)
        unknown = sorted(set(self.quantities.values()) - set(measured))
        if unknown:
            raise ValueError(f"control_quantities names {unknown}, which the control measure does not return "
                             f"(it returns {sorted(measured)}); fix control_quantities.")
        return {name: float(measured[q]) for name, q in self.quantities.items()}


def control_summary(samples: Sequence[Mapping[str, Any]], ranges: Mapping[str, tuple[float, float]] | None = None
                    ) -> dict[str, dict[str, float]]:
    """Error per condition over the samples that requested it: ``n``, ``mae``, ``mae_percent_of_range`` (of the
    training range, when known), and for integer requests (counts) ``exact_match`` (rounded measurement equals
    the request).

    Args:
        samples: manifest entries with ``condition`` (requested) and ``measured`` mappings.
        ranges: condition name -> ``(min, max)`` of the training split.
    """
    out: dict[str, dict[str, float]] = {}
    names = sorted({n for s in samples for n in s.get("measured", {})})
    for name in names:
        pairs = [(float(s["condition"][name]), float(s["measured"][name])) for s in samples
                 if name in s.get("condition", {}) and name in s.get("measured", {})]
        if not pairs:
            continue
        requested, measured = np.array(pairs).T
        summary = {"n": len(pairs), "mae": float(np.mean(np.abs(measured - requested)))}
        low, high = (ranges or {}).get(name, (0.0, 0.0))
        if high > low:
            summary["mae_percent_of_range"] = 100.0 * summary["mae"] / (high - low)
        if np.all(requested == np.round(requested)):
            summary["exact_match"] = float(np.mean(np.round(measured) == requested))
        out[name] = summary
    return out
