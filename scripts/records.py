"""The stage-2 training record: how the diffusion model was trained, so that generation samples it the same way.

Stage 2 writes the record beside its weights, ``models/model_record.json`` (atomically, with every checkpoint, with
the sha256 of the weight files written with it), and into ``checkpoint_diffusion.pt`` under ``record``. Its keys are
the config ids the values come from (``noise_scheduler_type``, ``prediction_type``, ``beta_start``, ``scale_factor``,
``latent_shape``, ``spacing``...): generation takes each default from the record (:func:`recorded`) and refuses a
value given on the command line or by an overlay that contradicts it (:func:`check_against_record`). Weights without
a record (the Model Zoo BraTS bundle's) are sampled with the config's values and an explicit ``--scale_factor``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from scripts.autoencoders import latent_spatial_shape
from scripts.storage import file_sha256, load_checkpoint, sha256_mismatch

__all__ = [
    "RECORD_FILENAME",
    "TrainingRecord",
    "check_against_record",
    "check_weights_against_record",
    "generation_latent_shape",
    "intensity_scaling",
    "read_training_record",
    "recorded",
    "training_record",
]

RECORD_FILENAME = "model_record.json"
#: what stage-2 checkpoints written before the record held at their top level
LEGACY_KEYS = ("scale_factor", "noise_scheduler_type", "prediction_type", "latent_shape")
#: how to supply a value that no record holds
HINTS = {"scale_factor": "stage-2 training prints it; weights from the Model Zoo BraTS bundle were sampled with 1.0"}
_REQUIRED = object()


class TrainingRecord(dict):
    """The values of a training record (config id -> value) and ``path``, the file they were read from (``None``:
    no record was found, the mapping is empty)."""

    def __init__(self, values: Mapping[str, Any] | None = None, path: str | None = None) -> None:
        super().__init__(values or {})
        self.path = path


def _plain(value: Any) -> Any:
    """A JSON-able copy of ``value`` (tensors and tuples as numbers and lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def intensity_scaling(transforms: Sequence[Any]) -> dict[str, Any]:
    """Settings of the percentile intensity scaling in a preprocessing chain (``ScaleIntensityRangePercentiles``:
    percentiles, output range, clipping), or ``{}`` when the chain has none."""
    for transform in transforms:
        scaler = getattr(transform, "scaler", transform)
        if type(scaler).__name__ == "ScaleIntensityRangePercentiles":
            return {k: _plain(getattr(scaler, k)) for k in ("lower", "upper", "b_min", "b_max", "clip", "relative",
                                                             "channel_wise") if hasattr(scaler, k)}
    return {}


def training_record(settings: Mapping[str, Any], noise_scheduler: Mapping[str, Any], autoencoder_path: str,
                    intensity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record of a stage-2 run, JSON-able.

    Args:
        settings: config id -> value as the run used it: the noise scheduler's type and settings, the prediction
            type, the scale factor, the latent shape, the volume size, spacing, orientation and channel.
        noise_scheduler: the training scheduler's class and constructor arguments
            (:func:`scripts.schedulers.describe_scheduler`).
        autoencoder_path: the stage-1 weights the latents come from; their sha256 is recorded.
        intensity: the intensity scaling of the preprocessing (:func:`intensity_scaling`).
    """
    import monai

    return {**{k: _plain(v) for k, v in settings.items()}, "noise_scheduler": _plain(noise_scheduler),
            "intensity_scaling": _plain(intensity or {}), "autoencoder_path": str(autoencoder_path),
            "autoencoder_sha256": file_sha256(autoencoder_path), "monai": str(monai.__version__),
            "torch": str(torch.__version__)}


def read_training_record(record_path: str | None, checkpoint_path: str | None = None) -> TrainingRecord:
    """The training record at ``record_path``; else the one in the stage-2 checkpoint (``record``, or the values
    older checkpoints kept at their top level); else an empty record (``path`` ``None``)."""
    if record_path and Path(record_path).is_file():
        with open(record_path) as f:
            return TrainingRecord(json.load(f), str(record_path))
    if checkpoint_path and Path(checkpoint_path).is_file():
        state = load_checkpoint(checkpoint_path, what="stage-2 checkpoint (for its training record)")
        values = state.get("record") or {k: state[k] for k in LEGACY_KEYS if k in state}
        return TrainingRecord(_plain(values), str(checkpoint_path))
    return TrainingRecord()


def recorded(record: TrainingRecord, key: str, default: Any = _REQUIRED) -> Any:
    """``record[key]``, else ``default``.

    Raises:
        KeyError: neither is there; the message says which config value to pass.
    """
    if key in record:
        return record[key]
    if default is not _REQUIRED:
        return default
    where = f"the training record {record.path} has no '{key}'" if record.path else "no training record was found"
    hint = f" ({HINTS[key]})" if key in HINTS else ""
    raise KeyError(f"{where} (stage 2 writes {RECORD_FILENAME} beside its weights); pass --{key} explicitly{hint}, "
                   "or point --training_record_path at the record.")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_against_record(record: TrainingRecord, values: Mapping[str, Any]) -> bool:
    """Refuse a value that contradicts the training record.

    ``values`` are the config's (config id -> value); those not overridden come from the record, so they agree.

    Raises:
        ValueError: naming the first contradicting key, its value here and the recorded one.
    """
    for key, value in values.items():
        if key in record and not _same(_plain(value), record[key]):
            raise ValueError(f"{key}={_plain(value)!r} contradicts the training record {record.path}, where "
                             f"{key}={record[key]!r}; drop --{key} (generation takes it from the record).")
    return True


def check_weights_against_record(record: TrainingRecord, autoencoder_path: str, diffusion_path: str) -> bool:
    """Refuse weights that are not the ones the training record describes: an autoencoder other than the one stage 2
    encoded its latents with (``autoencoder_sha256``), or diffusion weights other than those written with the record
    (``weights_sha256``, by file name). Checks only what the record holds and the files that exist (a missing file
    is reported by the loader); weights without a record (e.g. the Model Zoo BraTS bundle's) pass.

    Raises:
        ValueError: one line naming the file, both hashes and what to do.
    """
    expected = record.get("autoencoder_sha256")
    actual = sha256_mismatch(autoencoder_path, expected)
    if actual:
        raise ValueError(f"the autoencoder {autoencoder_path} is not the one the diffusion model was trained on "
                         f"(sha256 {actual}, the training record {record.path} has "
                         f"{expected}): pass --load_autoencoder_path of that run's autoencoder, or retrain stage 2 "
                         "on this one.")
    expected = (record.get("weights_sha256") or {}).get(Path(diffusion_path).name)
    actual = sha256_mismatch(diffusion_path, expected)
    if actual:
        raise ValueError(f"the diffusion weights {diffusion_path} are not those the training record {record.path} "
                         f"was written with (sha256 {actual}, recorded {expected}): put the "
                         "model_record.json of the run that wrote these weights beside them, or pass "
                         "--training_record_path.")
    return True


def generation_latent_shape(record: TrainingRecord, image_size: Sequence[int] | None, latent_channels: int,
                            autoencoder: torch.nn.Module, volume_size: Sequence[int]) -> list[int]:
    """The latent shape ``(C, *latent_spatial)`` to sample: the training one (from the record, else that of
    ``volume_size``) unless ``image_size`` asks for another image size.

    Raises:
        ValueError: ``image_size`` does not divide by the autoencoder's downsampling factor.
    """
    if image_size is None:
        if "latent_shape" in record:
            return [int(s) for s in record["latent_shape"]]
        image_size = volume_size
    return [int(latent_channels)] + latent_spatial_shape(image_size, autoencoder, "image_size")
