"""Codebook usage of a VQ-VAE during stage-1 training: perplexity, dead codes and their re-initialisation."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from torch import nn

from scripts.autoencoders import is_vector_quantized
from scripts.distributed import unwrap

__all__ = ["CodebookUsage", "usage_perplexity"]

logger = logging.getLogger(__name__)


def usage_perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of the code-usage distribution: 1 when one code takes every vector, ``K`` when all ``K``
    codes are used equally often (0 when nothing was counted)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    return math.exp(float(-(p * torch.log(p.clamp_min(1e-30))).sum()))


class CodebookUsage:
    """Counts which codes the VQ-VAE's quantizer picks during training iterations and, after every window of
    ``interval`` iterations (or every epoch), reports:

    - ``codebook_perplexity``: perplexity of the window's code usage (see :func:`usage_perplexity`);
    - ``codebook_dead_codes``: codes used at most ``dead_code_threshold`` times in the window;
    - ``codebook_reinitialised``: dead codes just re-initialised (0 unless ``reinit_dead_codes``).

    They go into ``engine.state.metrics``, so the trainer's ``StatsHandler`` and ``TensorBoardStatsHandler`` listed
    after this handler log them at the end of each epoch, and into :attr:`history`.

    With ``reinit_dead_codes``, each dead code is replaced by a randomly chosen encoder output vector of the
    current batch (its EMA statistics reset to one use), so that it lands where the encoder puts data and can win
    vectors again. In a distributed run rank 0's choice is broadcast so the codebooks stay identical.

    Does nothing when ``network`` is not a ``VQVAE`` (a KL autoencoder has no codebook), so the stage-1 config can
    list it unconditionally.

    Args:
        network: the autoencoder being trained (a DDP wrapper is unwrapped).
        interval: iterations per usage window; ``None`` or 0 makes the window one epoch.
        dead_code_threshold: a code used at most this many times in a window is dead.
        reinit_dead_codes: re-initialise dead codes at the end of each window.
        image_key: key of the input images in ``engine.state.output``.
    """

    def __init__(
        self,
        network: nn.Module,
        interval: int | None = None,
        dead_code_threshold: int = 0,
        reinit_dead_codes: bool = False,
        image_key: str = CommonKeys.IMAGE,
    ) -> None:
        if dead_code_threshold < 0:
            raise ValueError(f"vq_dead_code_threshold must be >= 0, got {dead_code_threshold}.")
        self.network = network
        self.interval = int(interval or 0)
        self.dead_code_threshold = int(dead_code_threshold)
        self.reinit_dead_codes = bool(reinit_dead_codes)
        self.image_key = image_key
        self.history: list[dict[str, Any]] = []
        self._counts: torch.Tensor | None = None
        self._recording = False

    @property
    def quantizer(self) -> nn.Module | None:
        """The ``EMAQuantizer`` (codebook ``embedding``, ``ema_w``, ``ema_cluster_size``), or ``None``."""
        return unwrap(self.network).quantizer.quantizer if is_vector_quantized(self.network) else None

    def attach(self, engine: Engine) -> None:
        quantizer = self.quantizer
        if quantizer is None:
            return
        quantizer.register_forward_hook(self._count)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_recording, True)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._set_recording, False)
        window_end = Events.ITERATION_COMPLETED(every=self.interval) if self.interval else Events.EPOCH_COMPLETED
        engine.add_event_handler(window_end, self.end_window)

    def _set_recording(self, engine: Engine, on: bool) -> None:
        self._recording = on

    def _count(self, module: nn.Module, inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
        if not (self._recording and module.training):  # training forward passes only, not validation
            return
        counts = torch.bincount(output[2].detach().flatten(), minlength=module.num_embeddings)
        self._counts = counts if self._counts is None else self._counts + counts

    def end_window(self, engine: Engine) -> dict[str, Any]:
        """Report the window's usage into ``engine.state.metrics``, re-initialise dead codes if asked, start a new
        window. Returns the report."""
        quantizer = self.quantizer
        counts = self._counts if self._counts is not None else torch.zeros(quantizer.num_embeddings)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        dead = torch.nonzero(counts <= self.dead_code_threshold).flatten()
        report = {"codebook_perplexity": usage_perplexity(counts), "codebook_dead_codes": int(dead.numel()),
                  "codebook_reinitialised": 0}
        if self.reinit_dead_codes and dead.numel():
            output = engine.state.output or {}
            images = output.get(self.image_key) if isinstance(output, dict) else None
            if images is not None:
                report["codebook_reinitialised"] = self.reinitialise(dead, images)
        engine.state.metrics.update(report)
        self.history.append({"epoch": engine.state.epoch, "iteration": engine.state.iteration, **report})
        if report["codebook_reinitialised"]:
            logger.info(f"codebook: re-initialised {report['codebook_reinitialised']} dead code(s) of "
                        f"{quantizer.num_embeddings} from encoder outputs (epoch {engine.state.epoch}, "
                        f"iteration {engine.state.iteration}).")
        self._counts = None
        return report

    @torch.no_grad()
    def reinitialise(self, codes: torch.Tensor, images: torch.Tensor) -> int:
        """Set codebook vectors ``codes`` to random encoder output vectors of ``images`` ``(B, C, *spatial)``
        (distinct vectors while the batch has enough); returns how many codes were set."""
        ae = unwrap(self.network)
        quantizer = ae.quantizer.quantizer
        weight = quantizer.embedding.weight
        z = ae.encode(images.to(weight.device).float())
        flat = z.movedim(1, -1).reshape(-1, quantizer.embedding_dim).float()
        n = codes.numel()
        pick = torch.randperm(flat.shape[0], device=flat.device)[:n] if flat.shape[0] >= n else \
            torch.randint(0, flat.shape[0], (n,), device=flat.device)
        vectors = flat[pick].to(weight.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(vectors, src=0)
        codes = codes.to(weight.device)
        weight.data[codes] = vectors
        # EMA state of one use at the new position: the next EMA step keeps the code there unless it wins vectors
        quantizer.ema_cluster_size.data[codes] = 1.0
        quantizer.ema_w.data[codes] = vectors
        return n
