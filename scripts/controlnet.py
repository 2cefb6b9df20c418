"""Label-map control of the latent diffusion model with a ControlNet (Zhang et al. 2023, https://arxiv.org/abs/2302.05543):
the user's label vocabulary, the control image, the training objective and inferer, and the control check.

A label map (image resolution, integer classes) becomes the control image: one channel per class of the vocabulary
(``label_classes``, ``{index: name}``, background 0 implicit), 1 inside the class. MONAI's ``ControlNet`` encodes it
down to the latent grid and adds zero-initialised residuals to the frozen stage-2 UNet, so training starts from the
unconditional model. Training drops classes from the control image (``label_drop_prob``, per class: partial maps)
and, with ``control_drop_prob``, the whole control (the "no control" branch of classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import ControlNetDiffusionInferer, Inferer
from monai.transforms import MapTransform
from torch import nn

from scripts.diffusion import LatentDiffusionPrepareBatch
from scripts.randomness import SAMPLE_INDEX

__all__ = [
    "batch_label_map", "check_controlnet_record", "CheckLabelsd", "class_probabilities", "ClassWeightedMSE",
    "control_check", "control_image", "controlnet_dataset", "ControlNetPrepareBatch", "ControlNetTrainingInferer",
    "embedding_channels", "init_from_unet", "label_vocabulary", "latent_control", "load_controlnet", "null_control",
    "recorded_vocabulary",
]


def label_vocabulary(label_classes: Mapping[Any, str], key: str = "label_classes") -> dict[int, str]:
    """``{index: name}`` from a config mapping (JSON keys are strings), checked: indices are integers >= 1 (0 is the
    background), names non-empty and distinct.

    Raises:
        ValueError: one line naming ``key`` and the fix.
    """
    if not isinstance(label_classes, Mapping) or not label_classes:
        raise ValueError(f"{key} must map label values to class names, e.g. {{\"1\": \"brain\", \"2\": \"lesion\"}}; "
                         f"got {label_classes!r}.")
    vocabulary: dict[int, str] = {}
    for index, name in label_classes.items():
        try:
            value = int(index)
        except (TypeError, ValueError):
            value = None
        if value is None or str(value) != str(index).strip() or value < 1:
            raise ValueError(f"{key}: label value '{index}' is not an integer >= 1 (0 is the background); fix {key}.")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{key}: label value {value} has no class name; give each value a name in {key}.")
        vocabulary[value] = name.strip()
    names = list(vocabulary.values())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{key}: class names {repeated} are given to several label values; use distinct names.")
    return dict(sorted(vocabulary.items()))


def _source(data: Mapping, key: Hashable) -> str:
    value = data[key]
    meta = getattr(value, "meta", {}) or {}
    return str(meta.get("filename_or_obj") or data.get(f"{key}_path") or key)


class CheckLabelsd(MapTransform):
    """Refuse a label map that is not one 3D channel of the vocabulary's values, or that holds no class at all.

    Args:
        keys: the label key(s).
        label_classes: the vocabulary (:func:`label_vocabulary`).
        allow_empty: accept a map with background only.

    Raises:
        ValueError: one line naming the file, what is wrong and the fix.
    """

    def __init__(self, keys: Any, label_classes: Mapping[Any, str], allow_empty: bool = False) -> None:
        super().__init__(keys)
        self.classes = label_vocabulary(label_classes)
        self.allow_empty = allow_empty

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            source = _source(d, key)
            shape = tuple(label.shape)
            if len(shape) != 4 or shape[0] != 1:
                raise ValueError(f"label map {source}: shape {shape[1:] if len(shape) > 1 else shape} (after channel "
                                 "first) is not one 3D volume; give a single-channel 3D label map.")
            array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise ValueError(f"label map {source} holds non-integer values; label maps hold class indices.")
            values = {int(v) for v in np.unique(array)}
            unknown = sorted(values - {0} - set(self.classes))
            if unknown:
                raise ValueError(f"label map {source} holds values {unknown} that are not in label_classes "
                                 f"{ {k: v for k, v in self.classes.items()} }; remap them to 0 or add them to "
                                 "label_classes.")
            if not self.allow_empty and values <= {0}:
                raise ValueError(f"label map {source} is empty (background only); give a map with at least one "
                                 f"class of {list(self.classes.values())}.")
        return d


def control_image(label: torch.Tensor, classes: Sequence[int], keep: torch.Tensor | None = None) -> torch.Tensor:
    """The control image of label maps: ``(B, len(classes), *spatial)`` float, channel ``k`` is 1 inside class
    ``classes[k]``; ``keep`` ``(B, len(classes))`` zeroes the channels of dropped classes.

    Args:
        label: ``(B, 1, *spatial)`` integer label maps, image resolution.
        classes: label values, one channel each.
        keep: 1 for the classes kept in each item.
    """
    label = label.round().long()
    channels = torch.cat([(label == int(c)).float() for c in classes], dim=1)
    if keep is not None:
        channels = channels * keep.to(channels.device, channels.dtype).view(*keep.shape, *([1] * (label.ndim - 2)))
    return channels


def latent_control(control: torch.Tensor, latent_spatial: Sequence[int]) -> torch.Tensor:
    """The control image at latent resolution, for ``concat`` mode: the fraction of each latent voxel's footprint
    that each class covers, ``(B, classes, *latent_spatial)``."""
    return nn.functional.adaptive_avg_pool3d(control.float(), tuple(int(s) for s in latent_spatial))


def null_control(control: torch.Tensor, classes: Sequence[int], removed: Sequence[int] | None) -> torch.Tensor:
    """The unconditional branch of guidance on the control: the control with the channels of ``removed`` label
    values zeroed (the map without, e.g., its lesions, as MAISI does for tumours); ``None``: no control at all."""
    if removed is None:
        return torch.zeros_like(control)
    keep = torch.tensor([0.0 if int(c) in {int(r) for r in removed} else 1.0 for c in classes])
    return control * keep.to(control).view(1, -1, *([1] * (control.ndim - 2)))


def class_probabilities(value: float | Mapping[str, float], classes: Mapping[int, str], key: str) -> torch.Tensor:
    """A per-class probability ``(len(classes),)`` from a number (every class) or ``{class name: p}`` (others 0).

    Raises:
        ValueError: a name not in the vocabulary or a value outside [0, 1], naming ``key``.
    """
    names = list(classes.values())
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{key} names classes {unknown} that are not in label_classes {names}; fix {key}.")
        probs = [float(value.get(n, 0.0)) for n in names]
    else:
        probs = [float(value)] * len(names)
    if any(not 0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"{key} must be probabilities in [0, 1]; got {value!r}.")
    return torch.tensor(probs)


def batch_label_map(batchdata: Mapping, label_key: str, device: torch.device, what: str,
                    non_blocking: bool = False) -> torch.Tensor:
    """The label maps of a training batch on ``device``; a batch without them is refused naming the key (``what``
    names the workflow's batch in the message)."""
    if label_key not in batchdata:
        raise KeyError(f"the {what} batch has no '{label_key}' (label map); give every datalist item a "
                       f"'{label_key}' file or fix label_key.")
    return torch.as_tensor(batchdata[label_key]).to(device=device, non_blocking=non_blocking)


class ControlNetPrepareBatch(LatentDiffusionPrepareBatch):
    """The stage-2 objective with a label-map control: :class:`LatentDiffusionPrepareBatch`'s ``(inputs, target, (),
    kwargs)`` plus ``kwargs["control"]``, the control image (:func:`control_image`) of the batch's label maps, with
    classes dropped per item with ``label_drop_prob`` and the whole control dropped with ``control_drop_prob``.
    With ``as_condition`` (a UNet trained with the label map from the start), the control goes to latent resolution
    (:func:`latent_control`) into the condition slot instead, concatenated to the UNet's input channels
    (``kwargs["condition"]``, ``kwargs["mode"] = "concat"``).

    Args:
        label_classes: the vocabulary ``{index: name}``.
        label_key: batch key of the label maps ``(B, 1, *spatial)`` (image resolution).
        label_drop_prob: probability of removing a class from an item's control (a number, or ``{name: p}``).
        control_drop_prob: probability of removing an item's whole control (trains the unconditional branch).
        as_condition: give the control as a concatenated condition at latent resolution (``concat`` mode).
        other arguments: see :class:`scripts.diffusion.LatentDiffusionPrepareBatch`.
    """

    def __init__(self, noise_scheduler: nn.Module, scale_factor: float, label_classes: Mapping[Any, str],
                 label_key: str = "label", label_drop_prob: float | Mapping[str, float] = 0.0,
                 control_drop_prob: float = 0.1, as_condition: bool = False, latents: Callable | None = None,
                 condition_name: str | Sequence[str] | None = None, sample_seed: int | None = None) -> None:
        if as_condition and condition_name:
            raise ValueError(f"the label map takes the condition slot in concat mode; condition_name "
                             f"{condition_name!r} cannot share it (set condition_name to null, or use the ControlNet).")
        super().__init__(noise_scheduler, scale_factor, latents=latents, condition_name=condition_name,
                         sample_seed=sample_seed)
        self.as_condition = bool(as_condition)
        self.classes = label_vocabulary(label_classes)
        self.label_key = label_key
        self.label_drop = class_probabilities(label_drop_prob, self.classes, "label_drop_prob")
        self.control_drop = float(class_probabilities(control_drop_prob, {1: "all"}, "control_drop_prob")[0])
        self.last_control: torch.Tensor | None = None  # the latest batch's control image (for ClassWeightedMSE)

    def extra_inputs(self, batchdata: dict, latents: torch.Tensor, infer_kwargs: dict,
                     non_blocking: bool = False) -> None:
        label = batch_label_map(batchdata, self.label_key, latents.device, "ControlNet", non_blocking)
        n = label.shape[0]
        keep = (self._rand((n, len(self.classes))) >= self.label_drop).float()
        keep = keep * (self._rand((n, 1)) >= self.control_drop).float()
        self.last_control = control_image(label, list(self.classes), keep)
        if self.as_condition:
            infer_kwargs.update(condition=latent_control(self.last_control, latents.shape[2:]), mode="concat")
        else:
            infer_kwargs["control"] = self.last_control


class ControlNetTrainingInferer(Inferer):
    """The training forward of a ControlNet on a frozen diffusion UNet, with the engine's calling convention
    ``inferer(inputs, network, noise=..., timesteps=..., control=..., condition=...)``: ``network`` is the ControlNet
    being trained, ``diffusion_model`` the frozen UNet (MONAI's ``ControlNetDiffusionInferer`` underneath).

    Args:
        scheduler: the training noise scheduler.
        diffusion_model: the trained stage-2 UNet (frozen).
        mode: ``"crossattn"`` or ``"concat"`` for an optional ``condition``.
    """

    def __init__(self, scheduler: nn.Module, diffusion_model: nn.Module, mode: str = "crossattn") -> None:
        super().__init__()
        self.inferer = ControlNetDiffusionInferer(scheduler)
        self.diffusion_model = diffusion_model
        self.mode = mode

    def __call__(self, inputs: torch.Tensor, network: nn.Module, noise: torch.Tensor, timesteps: torch.Tensor,
                 control: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.inferer(inputs, self.diffusion_model, network, noise=noise, timesteps=timesteps, cn_cond=control,
                            condition=condition, mode=self.mode)


class ClassWeightedMSE(nn.Module):
    """MSE in latent space with more weight where the control shows small classes (e.g. lesions): each latent voxel
    weighs ``1 + sum_k (w_k - 1) * fraction of class k in its footprint`` (``w`` from ``class_loss_weights``, 1 for
    classes not named). Reads the control image of the current batch from ``prepare_batch.last_control``.

    Args:
        prepare_batch: the :class:`ControlNetPrepareBatch` of the engine.
        class_loss_weights: ``{class name: weight}``; empty: plain MSE.
    """

    def __init__(self, prepare_batch: ControlNetPrepareBatch, class_loss_weights: Mapping[str, float] | None = None
                 ) -> None:
        super().__init__()
        self.prepare_batch = prepare_batch
        names = list(prepare_batch.classes.values())
        weights = dict(class_loss_weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"class_loss_weights names classes {unknown} that are not in label_classes {names}.")
        self.weights = torch.tensor([float(weights.get(n, 1.0)) for n in names])

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = (prediction - target) ** 2
        control = self.prepare_batch.last_control
        if control is None or bool((self.weights == 1).all()):
            return error.mean()
        fractions = nn.functional.adaptive_avg_pool3d(control.float(), prediction.shape[2:])
        weight = 1.0 + ((self.weights.to(fractions) - 1.0).view(1, -1, 1, 1, 1) * fractions).sum(1, keepdim=True)
        return (error * weight).sum() / (weight.expand_as(error).sum())


def embedding_channels(width: int, autoencoder: nn.Module) -> list[int]:
    """Channels of the ControlNet's control-image encoder: ``width * 2**k`` for each stride-2 step it needs to go
    from the image grid down to the latent grid (``log2`` of the autoencoder's downsampling factor), plus one."""
    from scripts.autoencoders import adapt

    factor = int(adapt(autoencoder).downsample_factor())
    steps = int(round(np.log2(factor)))
    if 2**steps != factor:
        raise ValueError(f"the autoencoder downsamples by {factor}, not a power of 2: the ControlNet's control encoder "
                         "(stride-2 steps) cannot reach its latent grid.")
    return [int(width) * 2**k for k in range(steps + 1)]


def init_from_unet(controlnet: nn.Module, unet: nn.Module) -> nn.Module:
    """Start the ControlNet as a trainable copy of the UNet's encoder (the ControlNet paper's initialisation): every
    parameter whose name and shape match is copied; the zero-initialised control paths stay zero."""
    own = controlnet.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    own.update(copied)
    controlnet.load_state_dict(own)
    return controlnet


def controlnet_dataset(posteriors: Sequence[Mapping], items: Sequence[Mapping], label_transform: Callable,
                       label_key: str = "label", cache_rate: float = 1.0, num_workers: int = 0):
    """ControlNet training data: each item's cached posterior ``{"z_mu", "z_sigma"}`` (latent space) and its label
    map through ``label_transform`` (image resolution, on the training grid), cached in memory.

    Raises:
        KeyError: an item has no label map, naming the item.
    """
    from monai.data import CacheDataset

    data = []
    for index, (item, p) in enumerate(zip(items, posteriors, strict=True)):
        if not item.get(label_key):
            raise KeyError(f"datalist item {item.get('image', item)} has no '{label_key}'; ControlNet training needs a "
                           "label map for every training and validation item.")
        data.append({label_key: item[label_key], "z_mu": p["z_mu"], "z_sigma": p["z_sigma"], SAMPLE_INDEX: index})
    return CacheDataset(data=data, transform=label_transform, cache_rate=cache_rate, num_workers=num_workers,
                        progress=False)


def load_controlnet(controlnet: nn.Module | None, record: Mapping[str, Any], diffusion_path: str,
                    controlnet_path: str) -> nn.Module | None:
    """Check the ControlNet's record against the diffusion weights (:func:`check_controlnet_record`) and load its
    weights; ``None`` (a UNet trained with the label map in concat mode) loads nothing."""
    if controlnet is None:
        return None
    from scripts.weights import load_weights

    check_controlnet_record(record, diffusion_path, controlnet_path)
    return load_weights(controlnet, controlnet_path, what="ControlNet")


def recorded_vocabulary(record: Mapping[str, Any], weights_path: str) -> dict[int, str]:
    """The label vocabulary of trained weights, from their record.

    Raises:
        FileNotFoundError: no record beside the weights, naming the file to give.
    """
    if not getattr(record, "path", None) or "label_classes" not in record:
        raise FileNotFoundError(f"no model_controlnet_record.json with label_classes beside {weights_path} "
                                "(configs/train_controlnet.json writes it with the weights; it holds the label "
                                "vocabulary); pass --controlnet_record_path.")
    return label_vocabulary(record["label_classes"])


def check_controlnet_record(record: Mapping[str, Any], diffusion_path: str, controlnet_path: str) -> bool:
    """Refuse a ControlNet without its record (the vocabulary) or one trained on other diffusion weights.

    Raises:
        FileNotFoundError: no record beside the ControlNet weights.
        ValueError: the diffusion weights are not those the ControlNet was trained on, naming both files.
    """
    from scripts.storage import sha256_mismatch

    recorded_vocabulary(record, controlnet_path)
    expected = record.get("diffusion_sha256")
    actual = sha256_mismatch(diffusion_path, expected)
    if actual:
        raise ValueError(f"the ControlNet {controlnet_path} was trained on diffusion weights "
                         f"{record.get('diffusion_path')} (sha256 {expected}), not on {diffusion_path} "
                         f"(sha256 {actual}): pass "
                         "--load_diffusion_path of those weights (and --use_ema to match).")
    return True


#: class names the demo's known-truth segmentation measures -> its mask
KNOWN_TRUTH_MASKS = {"brain": "brain", "ventricles": "ventricles", "lesion": "lesions"}


def control_check(image: np.ndarray, label: np.ndarray, classes: Mapping[int, str], spacing: Sequence[float],
                  segmenter: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """How well a generated image follows its label map: per class, the Dice between the requested region and the
    same class segmented on the image, and the relative volume error.

    Args:
        image: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` generated image in [0, 1], on the label's grid.
        label: the requested label map, same shape.
        classes: the vocabulary.
        spacing: voxel size (mm).
        segmenter: ``image -> label map`` in the same vocabulary; ``None``: the demo's known-truth segmentation
            (:mod:`scripts.evaluation.known_truth`), for the classes it knows (brain, ventricles, lesion).

    Returns:
        ``{class name: {"dice", "volume_error", "requested_ml", "measured_ml"}}``; classes the segmenter cannot
        measure are left out.
    """
    image = np.asarray(image, dtype=np.float32).reshape(np.shape(label)[-3:])
    label = np.asarray(label).reshape(image.shape)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    if segmenter is None:
        from scripts.evaluation.known_truth import segment

        masks = segment(image, spacing)
        measured = {name: masks[KNOWN_TRUTH_MASKS[name]] for name in classes.values() if name in KNOWN_TRUTH_MASKS}
    else:
        seg = np.asarray(segmenter(image)).reshape(image.shape)
        measured = {name: seg == index for index, name in classes.items()}
    result = {}
    for index, name in classes.items():
        if name not in measured:
            continue
        want, got = label == index, measured[name]
        total = want.sum() + got.sum()
        dice = float(2.0 * (want & got).sum() / total) if total else 1.0
        requested, found = float(want.sum()) * voxel_ml, float(got.sum()) * voxel_ml
        result[name] = {"dice": round(dice, 4), "requested_ml": round(requested, 3), "measured_ml": round(found, 3),
                        "volume_error": round((found - requested) / requested, 4) if requested else float(found > 0)}
    return result
