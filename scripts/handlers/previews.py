"""Handlers that show training: reconstruction previews (TensorBoard + PNG) and loss curves (PNG)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from scripts.distributed import is_main_rank
from scripts.storage import atomic_write_json
from scripts.visualize import montage, plot_curves

if TYPE_CHECKING:
    from scripts.sampling import LatentDiffusionPipeline

__all__ = ["LossCurves", "ReconstructionPreview", "SamplePreview"]

logger = logging.getLogger(__name__)


def _first_volume(x: Any) -> np.ndarray:
    if isinstance(x, (list, tuple)):
        x = x[0]
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 5:
            x = x[0]
        x = x.numpy()
    return np.asarray(x)


class ReconstructionPreview:
    """Input-vs-reconstruction mid-slices of the first validation volume, each validation round.

    Written as a TensorBoard image (tag ``<tag>/input_vs_reconstruction``) and as a PNG in ``output_dir``
    named by the trainer's epoch, so earlier previews are kept.

    Args:
        output_dir: folder of the PNG files.
        log_dir: TensorBoard folder; ``None`` writes only PNGs.
        tag: prefix of file names and TensorBoard tags.
    """

    def __init__(self, output_dir: str, log_dir: str | None = None, tag: str = "stage1") -> None:
        self.output_dir = Path(output_dir)
        self.log_dir = log_dir
        self.tag = tag
        self._writer = None
        self._pair: tuple[np.ndarray, np.ndarray] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._pair = None

    def _keep_first(self, engine: Engine) -> None:
        if self._pair is None:
            out = engine.state.output
            if isinstance(out, list):  # decollated
                out = out[0]
            self._pair = (_first_volume(out[CommonKeys.IMAGE]), _first_volume(out[CommonKeys.PRED]))

    def _write(self, engine: Engine) -> None:
        if self._pair is None or not is_main_rank():
            return
        epoch = engine.state.epoch
        image, recon = self._pair
        path = self.output_dir / f"{self.tag}_epoch{epoch:04d}.png"
        rgb = montage([("input", image), ("reconstruction", recon)], path, title=f"{self.tag}, epoch {epoch}")
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.log_dir)
            self._writer.add_image(f"{self.tag}/input_vs_reconstruction", rgb, epoch, dataformats="HWC")
            self._writer.flush()


class SamplePreview:
    """A few samples from the diffusion model at each validation round: mid-slices as PNG and TensorBoard image.

    Samples start from the same seeded noise every round, so the previews show the model's progress. They are
    drawn by the same :class:`scripts.sampling.LatentDiffusionPipeline` as generation.

    Args:
        pipeline: the sampling pipeline (usually on the EMA weights, with a fast sampler and few steps).
        latent_shape: ``(latent_channels, *latent_spatial)``.
        output_dir: folder of the PNG files.
        log_dir: TensorBoard folder, or ``None``.
        num_samples: samples per preview.
        seed: seed of the starting noise.
        tag: prefix of file names and TensorBoard tags.
    """

    def __init__(self, pipeline: LatentDiffusionPipeline, latent_shape: list[int], output_dir: str,
                 log_dir: str | None = None, num_samples: int = 2, seed: int = 0, tag: str = "stage2") -> None:
        self.pipeline = pipeline
        self.latent_shape = list(latent_shape)
        self.output_dir = Path(output_dir)
        self.log_dir = log_dir
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.tag = tag
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        if not is_main_rank() or self.num_samples < 1:
            return
        from scripts.sampling import initial_noise

        device = next(self.pipeline.network.parameters()).device
        noise = initial_noise(self.latent_shape, list(range(self.num_samples)), self.seed, device)
        images = self.pipeline(noise, progress=False).cpu().numpy()
        epoch = engine.state.epoch
        rgb = montage([(f"sample {i}", img) for i, img in enumerate(images)],
                      self.output_dir / f"{self.tag}_samples_epoch{epoch:04d}.png", title=f"{self.tag}, epoch {epoch}")
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.log_dir)
            self._writer.add_image(f"{self.tag}/samples", rgb, epoch, dataformats="HWC")
            self._writer.flush()


class LossCurves:
    """Per-epoch mean of each loss term, plotted to a PNG after every epoch, with the numbers beside it as JSON.

    Args:
        path: PNG destination (rewritten atomically each epoch of this run); the curves go to the same name
            with a ``.json`` suffix.
        output_transform: ``engine.state.output -> {name: float}``.
        title: plot title.
    """

    def __init__(self, path: str, output_transform: Callable[[Any], dict[str, float]], title: str = "") -> None:
        self.path = Path(path)
        self.output_transform = output_transform
        self.title = title
        self._sums: dict[str, list[float]] = defaultdict(list)
        self.curves: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._plot)

    def _collect(self, engine: Engine) -> None:
        for name, value in (self.output_transform(engine.state.output) or {}).items():
            self._sums[name].append(float(value))

    def _plot(self, engine: Engine) -> None:
        for name, values in self._sums.items():
            if values:
                self.curves[name].append((engine.state.epoch, float(np.mean(values))))
        self._sums = defaultdict(list)
        if is_main_rank():
            plot_curves(self.curves, self.path, title=self.title)
            atomic_write_json(self.curves, self.path.with_suffix(".json"))
