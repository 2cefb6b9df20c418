"""Ignite/MONAI handlers of the bundle: checkpoints and resume, previews and loss curves, progress, VQ codebook usage."""

from scripts.handlers.checkpoint import TrainingCheckpoint, is_main_process
from scripts.handlers.codebook import CodebookUsage
from scripts.handlers.ema import EMA
from scripts.handlers.previews import LossCurves, ReconstructionPreview, SamplePreview
from scripts.handlers.progress import ProgressBar

__all__ = [
    "EMA",
    "CodebookUsage",
    "LossCurves",
    "ProgressBar",
    "ReconstructionPreview",
    "SamplePreview",
    "TrainingCheckpoint",
    "is_main_process",
]
