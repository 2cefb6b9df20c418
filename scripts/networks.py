"""Single-tensor wrappers of the bundle's networks for inference, ``verify_net_in_out`` and TorchScript export.

The networks themselves are MONAI's (``AutoencoderKL`` or ``VQVAE``, ``PatchDiscriminator``,
``DiffusionModelUNet``), defined once in ``configs/common.json`` (the ``VQVAE`` in the ``configs/vqvae.json`` overlay).
What differs between the two stage-1 kinds (posterior, decoding, the reconstruction and export forms) is in
:mod:`scripts.autoencoders`; loading weights into these networks is :mod:`scripts.weights`.

The wrappers that a weight file is loaded into (:class:`DiffusionDenoiser`, :class:`TimestepChannelUNet`, and the
autoencoders' reconstruction forms) share the wrapped network's modules instead of holding it as a child, so their
state dict is the network's own: ``model.pt`` and ``model_autoencoder.pt`` load into them strictly, with no key prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from scripts.autoencoders import adapt, same_modules
from scripts.distributed import unwrap

__all__ = ["AutoencoderDecoder", "DiffusionDenoiser", "TimestepChannelUNet"]


class AutoencoderDecoder(nn.Module):
    """Latent ``(B, latent_channels, *latent_spatial)`` -> image ``(B, C, *spatial)``, undoing the scale factor:
    the adapter's ``decode`` (for a ``VQVAE`` it snaps every latent vector to its nearest code before decoding, so
    the decoder sees only the inputs it was trained on).

    One tensor in, one tensor out, for MONAI inferers (tiled decoding with a ``SlidingWindowInferer``).

    Args:
        autoencoder: the stage-1 autoencoder.
        scale_factor: the factor latents were multiplied by for diffusion training; the decoder divides by it.
    """

    def __init__(self, autoencoder: nn.Module, scale_factor: float = 1.0) -> None:
        super().__init__()
        self.autoencoder = unwrap(autoencoder)
        self.scale_factor = float(scale_factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return adapt(self.autoencoder).decode(z, self.scale_factor)


class DiffusionDenoiser(DiffusionModelUNet):
    """The diffusion UNet with a fixed timestep, so that it takes one latent tensor ``(B, latent_channels,
    *latent_spatial)`` and returns one tensor of that shape.

    Only for ``verify_net_in_out`` and export checks; sampling calls the UNet with real timesteps. Made by
    :meth:`wrap`; it shares the UNet's modules, so ``model.pt``/``model_ema.pt`` load into it unchanged.
    """

    timestep: int

    @classmethod
    def wrap(cls, unet: nn.Module, timestep: int = 500) -> DiffusionDenoiser:
        obj = same_modules(cls, unwrap(unet))
        obj.timestep = int(timestep)
        return obj

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:  # type: ignore[override]
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)
        return super().forward(x, timesteps=t)


class TimestepChannelUNet(DiffusionModelUNet):
    """Export form of the diffusion UNet: one input tensor ``(B, latent_channels + 1, *latent_spatial)`` whose last
    channel holds each item's timestep (constant over space); returns the UNet output ``(B, latent_channels, ...)``.

    ``monai.bundle ckpt_export --use_trace true`` feeds a single tensor, and MONAI's attention blocks cannot be
    scripted, so the UNet is traced in this form. It shares the wrapped UNet's modules, so its state dict is the
    UNet's (``model.pt``/``model_ema.pt`` load into it unchanged).
    """

    @classmethod
    def wrap(cls, unet: nn.Module) -> TimestepChannelUNet:
        return same_modules(cls, unwrap(unet))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        timesteps = x[:, -1].flatten(1)[:, 0]
        return super().forward(x[:, :-1], timesteps=timesteps)
