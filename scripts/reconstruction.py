"""Stage-1 inference: write each input and its deterministic reconstruction as NIfTI, with per-volume metrics."""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.utils import CommonKeys

from scripts.distributed import is_main_rank
from scripts.nifti import save_nifti
from scripts.storage import atomic_write, atomic_write_json, new_run_dir

__all__ = ["ReconstructionWriter", "clamped_output", "volume_metrics"]

logger = logging.getLogger(__name__)


def volume_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    ssim_win_size: int = 7,
    ms_ssim_kernel_size: int = 3,
    ms_ssim_weights: Sequence[float] = (0.3, 0.3, 0.4),
) -> dict[str, float]:
    """PSNR, SSIM and MS-SSIM of one reconstruction against its input, both ``(1, C, *spatial)`` in image space.

    MS-SSIM uses ``len(ms_ssim_weights)`` scales; each side must exceed ``(kernel - 1) * 2 ** (scales - 1)``.
    """
    spatial_dims = pred.ndim - 2
    pred, target = pred.float().clamp(0, data_range), target.float()
    psnr = PSNRMetric(max_val=data_range)(pred, target)
    ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=ssim_win_size)(pred, target)
    ms_ssim = MultiScaleSSIMMetric(
        spatial_dims=spatial_dims, data_range=data_range, kernel_size=ms_ssim_kernel_size, weights=ms_ssim_weights
    )(pred, target)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "ms_ssim": float(ms_ssim.mean())}


def clamped_output(data_range: float = 1.0) -> Callable[[Mapping], tuple[torch.Tensor, torch.Tensor]]:
    """Output transform for the validation metrics: ``(pred clamped to [0, data_range], label)`` of an engine
    output, so validation scores reconstructions exactly as :func:`volume_metrics` (inference) does."""

    def transform(output: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        return output[CommonKeys.PRED].float().clamp(0, data_range), output[CommonKeys.LABEL].float()

    return transform


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _subject_name(meta: dict, index: int) -> str:
    source = meta.get("filename_or_obj")
    if isinstance(source, (list, tuple)):
        source = source[0]
    if not source:
        return f"volume_{index:04d}"
    name = Path(str(source)).name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


class ReconstructionWriter:
    """Evaluator handler: per volume, ``<subject>_input.nii.gz`` and ``<subject>_reconstruction.nii.gz`` with
    the input's affine, a row of ``metrics.csv`` (PSNR, SSIM, MS-SSIM) and, at the end, ``summary.json``.

    Everything goes into a new folder ``output_dir/reconstruction_<timestamp>``, so no earlier output is touched.

    Args:
        output_dir: parent folder of the run folders.
        metric_kwargs: arguments of :func:`volume_metrics` (kernel sizes, MS-SSIM weights, data range).
        checkpoint: path of the autoencoder weights, recorded in the summary.
    """

    def __init__(self, output_dir: str, metric_kwargs: dict | None = None, checkpoint: str | None = None) -> None:
        self.output_dir = output_dir
        self.metric_kwargs = dict(metric_kwargs or {})
        self.checkpoint = checkpoint
        self.run_dir: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start_run)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_batch)
        engine.add_event_handler(Events.COMPLETED, self._write_summary)

    def _start_run(self, engine: Engine) -> None:
        self.rows = []
        self._start = time.time()
        if is_main_rank():
            self.run_dir = new_run_dir(self.output_dir, "reconstruction")

    def _write_batch(self, engine: Engine) -> None:
        if self.run_dir is None:
            return
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for item in items:
            image, pred = item[CommonKeys.IMAGE], item[CommonKeys.PRED]
            if image.ndim == 4:  # decollated (C, *spatial)
                image, pred = image[None], pred[None]
            for b in range(image.shape[0]):
                meta = image[b].meta if isinstance(image, MetaTensor) else {}
                affine = np.asarray(meta.get("affine", np.eye(4)))
                name = _subject_name(meta, len(self.rows))
                save_nifti(image[b], affine, self.run_dir / f"{name}_input.nii.gz")
                save_nifti(pred[b], affine, self.run_dir / f"{name}_reconstruction.nii.gz")
                scores = volume_metrics(_plain(pred[b : b + 1]), _plain(image[b : b + 1]), **self.metric_kwargs)
                self.rows.append({"subject": name, **scores})

    def _write_summary(self, engine: Engine) -> None:
        if self.run_dir is None:
            return
        fields = ["subject", "psnr", "ssim", "ms_ssim"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.run_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
        summary: dict[str, Any] = {"num_volumes": len(self.rows), "seconds": round(time.time() - self._start, 2),
                                   "checkpoint": self.checkpoint}
        for metric in fields[1:]:
            values = np.array([r[metric] for r in self.rows], dtype=np.float64)
            summary[metric] = {"mean": float(values.mean()) if len(values) else None,
                               "std": float(values.std()) if len(values) else None}
        atomic_write_json(summary, self.run_dir / "summary.json")
        print(f"reconstructions of {len(self.rows)} volume(s) written to {self.run_dir}; "
              f"PSNR {summary['psnr']['mean']:.2f} dB, SSIM {summary['ssim']['mean']:.4f}, "
              f"MS-SSIM {summary['ms_ssim']['mean']:.4f}")
