"""The two stage-1 autoencoder kinds behind one interface: MONAI's ``AutoencoderKL`` and ``VQVAE``.

Everything that trains, encodes or reconstructs with the stage-1 network goes through :func:`adapt`, which picks
the adapter from the network's type, so the trainer, the latent cache and the reconstruction wrapper hold no
per-kind branches:

- ``adapter(images)`` -> ``(reconstruction, regularisers)``: the training forward pass; ``regularisers`` maps a
  name (``"kl"`` or ``"quantization"``) to an unweighted scalar that :class:`scripts.losses.AutoencoderLoss`
  weights (``kl_weight`` / ``quantization_weight``).
- ``adapter.posterior(images)`` -> ``(z_mu, z_sigma)``: the stage-2 latent distribution. For the VQ-VAE it is
  the quantised embedding with ``z_sigma = 0``, so stage 2 runs continuous latent diffusion on quantised
  embeddings (as MONAI's ``VQVAE.encode_stage_2_inputs``).
- ``adapter.reconstruct(images)``: deterministic reconstruction (posterior mean / nearest codes), never
  updating the codebook.

Decoding diffusion latents needs no adapter: both networks' ``decode_stage_2_outputs`` map a latent to an image,
and the VQ-VAE's snaps each latent vector to its nearest code first (see :class:`scripts.networks.AutoencoderDecoder`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import VQVAE
from torch import nn

from scripts.losses import kl_divergence
from scripts.networks import nearest_codes, unwrap

__all__ = ["AutoencoderAdapter", "KLAutoencoderAdapter", "VQAutoencoderAdapter", "adapt", "is_vector_quantized"]


def is_vector_quantized(network: nn.Module) -> bool:
    """Whether ``network`` (possibly DDP-wrapped) is a MONAI ``VQVAE``."""
    return isinstance(unwrap(network), VQVAE)


class AutoencoderAdapter:
    """What the bundle needs from a stage-1 network; subclasses implement it for one MONAI network.

    Args:
        autoencoder: the network; a DDP wrapper is kept for the training forward pass, other methods use the bare
            network.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        self.network = autoencoder
        self.autoencoder = unwrap(autoencoder)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training forward pass: image ``(B, C, *spatial)`` -> (reconstruction, same shape; unweighted
        regularisers by name, scalars)."""
        raise NotImplementedError

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-2 latent distribution: mean and standard deviation, each ``(B, latent_channels, *latent_spatial)``."""
        raise NotImplementedError

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction, image space, same shape as ``images``."""
        raise NotImplementedError


class KLAutoencoderAdapter(AutoencoderAdapter):
    """``AutoencoderKL``: KL-regularised, the latent is a diagonal Gaussian posterior."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction of a posterior sample and ``{"kl": KL(posterior || N(0, 1))}``."""
        recon, z_mu, z_sigma = self.network(images)
        return recon, {"kl": kl_divergence(z_mu.float(), z_sigma.float())}

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation."""
        return self.autoencoder.encode(images)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean (``encode_stage_2_inputs`` would sample)."""
        return self.autoencoder.reconstruct(images)


class VQAutoencoderAdapter(AutoencoderAdapter):
    """``VQVAE``: vector-quantised with an EMA codebook; the latent is the quantised embedding."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction and ``{"quantization"}``: the commitment loss, already multiplied by the quantizer's
        ``commitment_cost``. In training mode the codebook takes an EMA step."""
        recon, quantization_loss = self.network(images)
        return recon, {"quantization": quantization_loss.float()}

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantised embedding ``(B, embedding_dim, *latent_spatial)`` and a zero standard deviation."""
        e = nearest_codes(self.autoencoder, self.autoencoder.encode(images))
        return e, torch.zeros_like(e)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the nearest codes of the encoding."""
        return self.autoencoder.decode(self.posterior(images)[0])


def adapt(autoencoder: nn.Module) -> AutoencoderAdapter:
    """The adapter for a stage-1 network: :class:`VQAutoencoderAdapter` for a ``VQVAE``, else the KL one."""
    return VQAutoencoderAdapter(autoencoder) if is_vector_quantized(autoencoder) else KLAutoencoderAdapter(autoencoder)
