"""Helpers around MONAI's generative networks: weight loading with clear errors, the autoencoder's
downsampling factor and thin single-tensor wrappers for ``verify_net_in_out`` and TorchScript export.

The networks themselves are MONAI's (``AutoencoderKL`` or ``VQVAE``, ``PatchDiscriminator``,
``DiffusionModelUNet``), defined once in ``configs/common.json`` (the ``VQVAE`` in the ``configs/vqvae.json`` overlay).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def load_weights(network: nn.Module, path: str, key: str | None = None, what: str = "weights") -> nn.Module:
    """Load a state dict from ``path`` into ``network`` (strict), failing with one clear message.

    Accepts plain state dicts (the Model Zoo's ``model_autoencoder.pt``/``model.pt``) and training checkpoints
    holding the state dict under ``key``.

    Args:
        network: the module to load into (a DDP wrapper is unwrapped).
        path: checkpoint file.
        key: key of the state dict inside a training checkpoint; tried only when present.
        what: words naming the weights in messages, e.g. ``"autoencoder"``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file holds weights of another architecture or size.
    """
    state = load_checkpoint(path, what=f"{what} checkpoint")
    if isinstance(state, Mapping) and key is not None and key in state and isinstance(state[key], Mapping):
        state = state[key]
    target = unwrap(network)
    own = target.state_dict()
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

    Uses the quantizer's pure lookup, so the EMA codebook is not updated even in training mode.
    """
    quantizer = unwrap(autoencoder).quantizer.quantizer
    _, _, indices = quantizer.quantize(z)
    return quantizer.embed(indices).to(z.dtype)
