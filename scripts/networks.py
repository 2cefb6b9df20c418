"""Helpers around MONAI's generative networks: weight loading with clear errors, the autoencoder's
downsampling factor and thin single-tensor wrappers for ``verify_net_in_out`` and TorchScript export.

The networks themselves are MONAI's (``AutoencoderKL`` or ``VQVAE``, ``PatchDiscriminator``,
``DiffusionModelUNet``), defined once in ``configs/common.json`` (the ``VQVAE`` in the ``configs/vqvae.json`` overlay).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import VQVAE, AutoencoderKL, DiffusionModelUNet
from torch import nn

from scripts.storage import load_checkpoint

__all__ = [
    "AutoencoderDecoder",
    "AutoencoderReconstruction",
    "DiffusionDenoiser",
    "LatentDecoder",
    "TimestepChannelUNet",
    "VQLatentDecoder",
    "check_spatial_size",
    "downsample_factor",
    "is_legacy_state_dict",
    "latent_spatial_shape",
    "load_weights",
    "nearest_codes",
    "unwrap",
]


def unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside a ``DistributedDataParallel``/``DataParallel``/compiled wrapper."""
    while hasattr(network, "module") and isinstance(network.module, nn.Module):
        network = network.module
    return getattr(network, "_orig_mod", network)


def downsample_factor(autoencoder: nn.Module) -> int:
    """Spatial downsampling factor of an ``AutoencoderKL`` (2 per level after the first) or ``VQVAE`` encoder (the
    product of its downsampling strides)."""
    ae = unwrap(autoencoder)
    encoder = getattr(ae, "encoder", ae)
    downsample = getattr(encoder, "downsample_parameters", None)
    if downsample is not None:  # VQVAE: one strided convolution per level
        factor = 1
        for params in downsample:
            factor *= int(params[0])
        return factor
    for attr in ("channels", "num_channels"):
        channels = getattr(encoder, attr, None)
        if channels is not None:
            return 2 ** (len(channels) - 1)
    raise TypeError(f"cannot tell the downsampling factor of {type(ae).__name__}")


def check_spatial_size(size: Sequence[int], autoencoder: nn.Module, name: str = "train_patch_size") -> list[int]:
    """Check that a spatial size divides by the autoencoder's downsampling factor.

    Raises:
        ValueError: naming the config key and the nearest valid sizes.
    """
    factor = downsample_factor(autoencoder)
    bad = [s for s in size if int(s) % factor]
    if bad:
        fixed = [max(factor, round(int(s) / factor) * factor) for s in size]
        raise ValueError(
            f"{name}={list(size)} is not divisible by the autoencoder's downsampling factor {factor} "
            f"(set by autoencoder_def); use e.g. {name}={fixed}."
        )
    return [int(s) for s in size]


def latent_spatial_shape(image_size: Sequence[int], autoencoder: nn.Module, name: str = "image_size") -> list[int]:
    """Latent spatial shape for an image size, with a clear error when the sizes are inconsistent."""
    factor = downsample_factor(autoencoder)
    return [s // factor for s in check_spatial_size(image_size, autoencoder, name)]


def latent_window(patch_size: Sequence[int], autoencoder: nn.Module, latent_shape: Sequence[int],
                  name: str = "decode_patch_size") -> list[int]:
    """The latent window of an image-space ``patch_size`` for tiled decoding, clipped to the latent
    ``(C, *spatial)`` being decoded (a larger window would decode zero padding)."""
    window = latent_spatial_shape(patch_size, autoencoder, name)
    return [min(w, s) for w, s in zip(window, latent_shape[1:], strict=True)]


# how to get each weight file the workflows load, for the message when it is missing
WEIGHTS_SOURCES = {
    "autoencoder": "python -m monai.bundle run --config_file configs/train_autoencoder.json",
    "diffusion model": (
        "python -m monai.bundle run --config_file \"['configs/train_autoencoder.json','configs/train_diffusion.json']\""
    ),
}

# markers of the old monai-generative (GenerativeModels, import name `generative`) key layout
LEGACY_MARKERS = (".proj_attn.", ".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def _missing_weights_message(what: str, path: str) -> str:
    train = WEIGHTS_SOURCES.get(what)
    how = f"train them with `{train}`" if train else "train that stage"
    return (
        f"{what} checkpoint not found: '{path}'. Fetch released weights listed in large_files.yml with "
        f"`python -m monai.bundle download_large_files --bundle_path <bundle root>`, {how}, "
        "or point the config's load_*_path at your file."
    )


def is_legacy_state_dict(state: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
    """Whether ``state`` is in the old ``monai-generative`` layout of the network whose state dict is ``own``.

    Old-layout keys name attention projections without MONAI core's ``.attn.`` level (``...to_q.weight``,
    ``...proj_attn.weight``) or the autoencoder's upsampling convolution ``conv`` where MONAI core has ``postconv``.
    """
    unexpected = [k for k in state if k not in own]
    return any(
        (any(m in k for m in LEGACY_MARKERS) and ".attn." not in k)
        or (".conv.conv." in k and k.replace(".conv.conv.", ".postconv.conv.") in own)
        for k in unexpected
    )


def _load_legacy(target: nn.Module, state: Mapping[str, Any], path: str, what: str) -> None:
    """Convert an old-layout state dict with MONAI's ``load_old_state_dict`` and load it, or fail with one line."""
    convert = getattr(target, "load_old_state_dict", None)
    if convert is None:
        raise ValueError(
            f"{what} checkpoint '{path}' is in the old monai-generative layout, which MONAI can convert only for "
            f"AutoencoderKL and DiffusionModelUNet, not {type(target).__name__}."
        )
    remaining = dict(state)  # MONAI pops every key it uses
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert(remaining)
    except (KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise ValueError(
            f"{what} checkpoint '{path}' is in the old monai-generative layout but does not match the network in "
            f"the config ({type(e).__name__}: {reason}). Use the network sizes it was trained with "
            "(e.g. merge configs/brats.json for the Model Zoo BraTS bundle's weights)."
        ) from e
    # monai-generative's attention blocks defined `proj_attn` but never applied it: dropping it keeps the outputs
    left = [k for k in remaining if ".proj_attn." not in k]
    if left:
        raise ValueError(
            f"{what} checkpoint '{path}' (old monai-generative layout) holds {len(left)} weight(s) the network in the "
            f"config has no place for, e.g. '{left[0]}'. Use the network sizes it was trained with."
        )
    print(f"[weights] {what}: converted the old monai-generative layout of '{path}' to MONAI core")


def load_weights(network: nn.Module, path: str, key: str | None = None, what: str = "weights") -> nn.Module:
    """Load a state dict from ``path`` into ``network`` (strict), failing with one clear message.

    Accepts plain state dicts (the Model Zoo's ``model_autoencoder.pt``/``model.pt``), training checkpoints
    holding the state dict under ``key``, and state dicts saved by the older ``monai-generative`` package
    (GenerativeModels), converted with MONAI's ``load_old_state_dict``.

    Args:
        network: the module to load into (a DDP wrapper is unwrapped).
        path: checkpoint file.
        key: key of the state dict inside a training checkpoint; tried only when present.
        what: words naming the weights in messages, e.g. ``"autoencoder"``.

    Raises:
        FileNotFoundError: the file is missing; the message says how to fetch or train it.
        ValueError: the file holds weights of another architecture or size.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(_missing_weights_message(what, path))
    state = load_checkpoint(path, what=f"{what} checkpoint")
    if isinstance(state, Mapping) and key is not None and key in state and isinstance(state[key], Mapping):
        state = state[key]
    target = unwrap(network)
    own = target.state_dict()
    if is_legacy_state_dict(state, own):
        _load_legacy(target, state, path, what)
        return network
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        detail = []
        if mismatched:
            k = mismatched[0]
            detail.append(f"shape of '{k}' is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the config")
        if missing:
            detail.append(f"{len(missing)} missing key(s), e.g. '{missing[0]}'")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s), e.g. '{unexpected[0]}'")
        raise ValueError(
            f"{what} checkpoint '{path}' does not match the network in the config ({'; '.join(detail)}). "
            "Use the config the checkpoint was trained with, or re-train."
        )
    target.load_state_dict(state)
    return network


class AutoencoderReconstruction(nn.Module):
    """Deterministic reconstruction: image ``(B, C, *spatial)`` -> decode(posterior mean, or nearest codes for a
    VQ-VAE), same shape.

    One tensor in, one tensor out, for ``verify_net_in_out``, evaluators and TorchScript export.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = unwrap(autoencoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from scripts.autoencoders import adapt  # imports this module

        return adapt(self.autoencoder).reconstruct(x)


class AutoencoderDecoder(nn.Module):
    """Latent ``(B, latent_channels, *latent_spatial)`` -> image ``(B, C, *spatial)``, undoing the scale factor.

    Uses ``decode_stage_2_outputs``: for a ``VQVAE`` that re-quantises, i.e. snaps every latent vector to its
    nearest code before decoding, so the decoder sees only the inputs it was trained on.

    Args:
        autoencoder: the stage-1 autoencoder.
        scale_factor: the factor latents were multiplied by for diffusion training; the decoder divides by it.
    """

    def __init__(self, autoencoder: nn.Module, scale_factor: float = 1.0) -> None:
        super().__init__()
        self.autoencoder = unwrap(autoencoder)
        self.scale_factor = float(scale_factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(z / self.scale_factor)


class DiffusionDenoiser(nn.Module):
    """The diffusion UNet with a fixed timestep, so that it takes one latent tensor and returns one tensor.

    Only for ``verify_net_in_out`` and export checks; sampling calls the UNet with real timesteps.
    """

    def __init__(self, network: nn.Module, timestep: int = 500) -> None:
        super().__init__()
        self.network = unwrap(network)
        self.timestep = int(timestep)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)
        return self.network(x, timesteps=t)


class TimestepChannelUNet(DiffusionModelUNet):
    """Export form of the diffusion UNet: one input tensor ``(B, latent_channels + 1, *latent_spatial)`` whose last
    channel holds each item's timestep (constant over space); returns the UNet output ``(B, latent_channels, ...)``.

    ``monai.bundle ckpt_export --use_trace true`` feeds a single tensor, and MONAI's attention blocks cannot be
    scripted, so the UNet is traced in this form. It shares the wrapped UNet's modules, so its state dict is the
    UNet's (``model.pt``/``model_ema.pt`` load into it unchanged).
    """

    @classmethod
    def wrap(cls, unet: nn.Module) -> TimestepChannelUNet:
        obj = cls.__new__(cls)
        obj.__dict__ = unwrap(unet).__dict__  # same modules and parameters, this class's forward
        return obj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        timesteps = x[:, -1].flatten(1)[:, 0]
        return super().forward(x[:, :-1], timesteps=timesteps)


class LatentDecoder(AutoencoderKL):
    """Export form of the decoder path: diffusion latent ``(B, C, *latent)`` -> image, ``decode(z / scale_factor)``.

    Shares the wrapped autoencoder's modules, so ``model_autoencoder.pt`` loads into it unchanged; the scale factor
    is a constant of the exported graph. ``wrap`` gives a :class:`VQLatentDecoder` for a ``VQVAE``.
    """

    @classmethod
    def wrap(cls, autoencoder: nn.Module, scale_factor: float = 1.0) -> LatentDecoder | VQLatentDecoder:
        target = VQLatentDecoder if isinstance(unwrap(autoencoder), VQVAE) else cls
        obj = target.__new__(target)
        obj.__dict__ = unwrap(autoencoder).__dict__
        obj.latent_scale_factor = float(scale_factor)
        return obj

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.decode(z / self.latent_scale_factor)


class VQLatentDecoder(VQVAE):
    """Export form of a ``VQVAE``'s decoder path: latent -> image, ``decode(nearest_codes(z / scale_factor))``.
    Made by :meth:`LatentDecoder.wrap`; shares the wrapped network's modules and state dict."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.decode(nearest_codes(self, z / self.latent_scale_factor))


def nearest_codes(autoencoder: VQVAE, z: torch.Tensor) -> torch.Tensor:
    """Quantise encoder outputs ``z`` ``(B, embedding_dim, *latent)`` to their nearest codebook vectors, same shape.

    Uses the quantizer's pure lookup, so the EMA codebook is not updated even in training mode. The vectors keep
    the codebook's precision when ``z`` has less (bfloat16 under autocast): quantised latents are codebook vectors.
    """
    quantizer = unwrap(autoencoder).quantizer.quantizer
    _, _, indices = quantizer.quantize(z)
    codes = quantizer.embed(indices)
    return codes.to(torch.promote_types(z.dtype, codes.dtype))
