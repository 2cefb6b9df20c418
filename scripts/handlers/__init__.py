"""Ignite/MONAI handlers of the bundle: checkpoints and resume, the best model, EMA updates, previews and loss
curves, progress, VQ codebook usage, schedules kept in step (the learning rate per optimiser step, the epoch that
keys the stage-2 draws)."""

from scripts.handlers.best import BestWeights
from scripts.handlers.checkpoint import TrainingCheckpoint
from scripts.handlers.codebook import CodebookUsage
from scripts.handlers.ema import EMA, EMAUpdate
from scripts.handlers.previews import LossCurves, ReconstructionPreview, SamplePreview
from scripts.handlers.progress import ProgressBar
from scripts.handlers.schedule import OptimizerStepLrSchedule, SetEpoch
from scripts.handlers.tracking import LossTermsForTracking, adapt_tracking_handlers

__all__ = [
    "BestWeights",
    "EMA",
    "EMAUpdate",
    "CodebookUsage",
    "LossCurves",
    "LossTermsForTracking",
    "OptimizerStepLrSchedule",
    "ProgressBar",
    "ReconstructionPreview",
    "SamplePreview",
    "SetEpoch",
    "TrainingCheckpoint",
    "adapt_tracking_handlers",
]
