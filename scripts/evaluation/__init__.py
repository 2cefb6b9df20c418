"""Evaluation of generated volumes (``configs/evaluate.json``): ``metrics`` (set-to-set metrics), ``features``
(feature extractors), ``known_truth`` (demo-phantom segmentation against recorded parameters), ``evaluate`` (the
workflow) and ``report`` (Markdown and PNG figures). Submodules load on first use."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["evaluate", "features", "known_truth", "metrics", "report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"scripts.evaluation.{name}")
    raise AttributeError(f"module 'scripts.evaluation' has no attribute '{name}'")
