"""Ignite/MONAI handlers of the bundle: checkpoints and resume, previews and loss curves, progress."""

from scripts.handlers.checkpoint import TrainingCheckpoint, is_main_process
from scripts.handlers.previews import LossCurves, ReconstructionPreview
from scripts.handlers.progress import ProgressBar

__all__ = ["TrainingCheckpoint", "is_main_process", "LossCurves", "ReconstructionPreview", "ProgressBar"]
