"""Ignite engines built on MONAI's: the stage-1 and stage-2 trainers, and the autocast inferer of inference."""

from scripts.engines.autoencoder_trainer import AutoencoderTrainer
from scripts.engines.base import (
    AutocastInferer,
    GenerativeTrainer,
    NonFiniteLossError,
    OptimizerStep,
    bf16_is_fast,
    loss_output,
)

__all__ = [
    "AutocastInferer", "AutoencoderTrainer", "GenerativeTrainer", "NonFiniteLossError", "OptimizerStep", "bf16_is_fast",
    "loss_output",
]
from scripts.engines.diffusion_trainer import (
    LatentDiffusionEvaluator,
    LatentDiffusionTrainer,
    diffusion_loss,
    lower_is_better,
)

__all__ += ["LatentDiffusionEvaluator", "LatentDiffusionTrainer", "diffusion_loss", "lower_is_better"]
