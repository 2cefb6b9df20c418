"""The two stage-1 autoencoder kinds behind one interface: MONAI's ``AutoencoderKL`` and ``VQVAE``.

Everything that trains, encodes, decodes, reconstructs or exports with the stage-1 network goes through
:func:`adapt`, which picks the adapter from the network's type, so the trainer, the latent cache, the decoders and
the size checks hold no per-kind branches:

- ``adapter(images)`` -> ``(reconstruction, regularisers)``: the training forward pass; ``regularisers`` maps a
  name (``"kl"`` or ``"quantization"``) to an unweighted scalar that :class:`scripts.losses.AutoencoderLoss`
  weights (``kl_weight`` / ``quantization_weight``).
- ``adapter.posterior(images)`` -> ``(z_mu, z_sigma)``: the stage-2 latent distribution. For the VQ-VAE it is
  the quantised embedding with ``z_sigma = 0``, so stage 2 runs continuous latent diffusion on quantised
  embeddings (as MONAI's ``VQVAE.encode_stage_2_inputs``).
- ``adapter.reconstruct(images)``: deterministic reconstruction (posterior mean / nearest codes), never
  updating the codebook.
- ``adapter.decode(latents, scale_factor)``: a diffusion latent (multiplied by ``scale_factor``) -> image. The
  VQ-VAE's snaps each latent vector to its nearest code first (as MONAI's ``decode_stage_2_outputs``, but a pure
  lookup), so the decoder sees only the inputs it was trained on.
- ``adapter.downsample_factor()``: the encoder's spatial downsampling factor, behind :func:`check_spatial_size`,
  :func:`latent_spatial_shape` and :func:`latent_window`.
- ``adapter.export_decoder(scale_factor)``: the decoder path as a network of the autoencoder's own class
  (:class:`KLLatentDecoder` / :class:`VQLatentDecoder`) for ``monai.bundle ckpt_export``.
- ``adapter.reconstruction_network()``: ``reconstruct`` as the network's ``forward``, again of the autoencoder's own
  class (:class:`KLReconstruction` / :class:`VQReconstruction`), for the reconstruction workflow, validation and
  MONAI Label.

Both forms share the autoencoder's modules, so their state dict *is* the autoencoder's: ``model_autoencoder.pt``
loads into them strictly, with no key prefix to add or strip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import VQVAE, AutoencoderKL
from torch import nn

from scripts.distributed import unwrap
from scripts.losses import kl_divergence

__all__ = [
    "AutoencoderAdapter",
    "KLAutoencoderAdapter",
    "KLLatentDecoder",
    "KLReconstruction",
    "VQAutoencoderAdapter",
    "VQLatentDecoder",
    "VQReconstruction",
    "adapt",
    "check_spatial_size",
    "downsample_factor",
    "is_vector_quantized",
    "latent_spatial_shape",
    "latent_window",
    "same_modules",
]


def is_vector_quantized(network: nn.Module) -> bool:
    """Whether ``network`` (possibly DDP-wrapped) is a MONAI ``VQVAE``."""
    return isinstance(unwrap(network), VQVAE)


class KLLatentDecoder(AutoencoderKL):
    """Export form of an ``AutoencoderKL``'s decoder path: diffusion latent ``(B, C, *latent)`` -> image,
    :meth:`KLAutoencoderAdapter.decode`.

    Made by :meth:`AutoencoderAdapter.export_decoder`; shares the wrapped autoencoder's modules, so
    ``model_autoencoder.pt`` loads into it unchanged, and the scale factor is a constant of the exported graph.
    """

    latent_scale_factor: float

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return KLAutoencoderAdapter(self).decode(z, self.latent_scale_factor)


class VQLatentDecoder(VQVAE):
    """Export form of a ``VQVAE``'s decoder path: diffusion latent -> image, :meth:`VQAutoencoderAdapter.decode`
    (nearest codes, then the decoder). Made by :meth:`AutoencoderAdapter.export_decoder`; shares the wrapped
    network's modules and state dict."""

    latent_scale_factor: float

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return VQAutoencoderAdapter(self).decode(z, self.latent_scale_factor)


class KLReconstruction(AutoencoderKL):
    """Deterministic reconstruction form of an ``AutoencoderKL``: image ``(B, C, *spatial)`` -> decode(posterior
    mean), same shape (:meth:`KLAutoencoderAdapter.reconstruct`). Made by
    :meth:`AutoencoderAdapter.reconstruction_network`; shares the wrapped autoencoder's modules and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return KLAutoencoderAdapter(self).reconstruct(x)


class VQReconstruction(VQVAE):
    """Deterministic reconstruction form of a ``VQVAE``: image -> decode(nearest codes of the encoding), same shape
    (:meth:`VQAutoencoderAdapter.reconstruct`, never updating the codebook). Made by
    :meth:`AutoencoderAdapter.reconstruction_network`; shares the wrapped network's modules and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return VQAutoencoderAdapter(self).reconstruct(x)


def same_modules(cls: type[nn.Module], network: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``network``'s modules and parameters (its state dict is ``network``'s): only
    ``forward`` differs."""
    obj = cls.__new__(cls)
    obj.__dict__ = network.__dict__
    return obj


class AutoencoderAdapter:
    """What the bundle needs from a stage-1 network; subclasses implement it for one MONAI network.

    Args:
        autoencoder: the network; a DDP wrapper is kept for the training forward pass, other methods use the bare
            network.
    """

    #: the export form of the decoder path, a subclass of the network's class (see :meth:`export_decoder`)
    export_decoder_class: type[nn.Module]
    #: the reconstruction form, a subclass of the network's class (see :meth:`reconstruction_network`)
    reconstruction_class: type[nn.Module]

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

    def decode(self, latents: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
        """Diffusion latents ``(B, latent_channels, *latent_spatial)``, multiplied by ``scale_factor`` for diffusion
        training, -> images ``(B, C, *spatial)``: the decoder applied to ``latents / scale_factor``."""
        raise NotImplementedError

    def downsample_factor(self) -> int:
        """Spatial downsampling factor of the encoder (image side / latent side)."""
        raise NotImplementedError

    def export_decoder(self, scale_factor: float = 1.0) -> nn.Module:
        """The decoder path, :meth:`decode` with ``scale_factor`` fixed, as a network of
        :attr:`export_decoder_class`, for ``monai.bundle ckpt_export --use_trace true``.

        It shares the autoencoder's modules (its state dict is the autoencoder's, so ``model_autoencoder.pt`` loads
        into it unchanged); only ``forward`` differs.
        """
        decoder = same_modules(self.export_decoder_class, self.autoencoder)
        decoder.latent_scale_factor = float(scale_factor)
        return decoder

    def reconstruction_network(self) -> nn.Module:
        """:meth:`reconstruct` as a network of :attr:`reconstruction_class`: one image tensor ``(B, C, *spatial)`` in,
        its reconstruction out, for evaluators, inferers and MONAI Label.

        It shares the autoencoder's modules, so its state dict is the autoencoder's (``model_autoencoder.pt`` loads
        into it strictly, unchanged); only ``forward`` differs.
        """
        return same_modules(self.reconstruction_class, self.autoencoder)


class KLAutoencoderAdapter(AutoencoderAdapter):
    """``AutoencoderKL``: KL-regularised, the latent is a diagonal Gaussian posterior."""

    export_decoder_class = KLLatentDecoder
    reconstruction_class = KLReconstruction

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

    def decode(self, latents: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
        """``decode(latents / scale_factor)`` (MONAI's ``decode_stage_2_outputs``)."""
        return self.autoencoder.decode(latents / scale_factor)

    def downsample_factor(self) -> int:
        """2 per level after the first."""
        encoder = getattr(self.autoencoder, "encoder", self.autoencoder)
        for attr in ("channels", "num_channels"):
            channels = getattr(encoder, attr, None)
            if channels is not None:
                return 2 ** (len(channels) - 1)
        raise TypeError(f"cannot tell the downsampling factor of {type(self.autoencoder).__name__}")


class VQAutoencoderAdapter(AutoencoderAdapter):
    """``VQVAE``: vector-quantised with an EMA codebook; the latent is the quantised embedding."""

    export_decoder_class = VQLatentDecoder
    reconstruction_class = VQReconstruction

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction and ``{"quantization"}``: the commitment loss, already multiplied by the quantizer's
        ``commitment_cost``. In training mode the codebook takes an EMA step."""
        recon, quantization_loss = self.network(images)
        return recon, {"quantization": quantization_loss.float()}

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise encoder outputs ``z`` ``(B, embedding_dim, *latent)`` to their nearest codebook vectors, same
        shape.

        Uses the quantizer's pure lookup, so the EMA codebook is not updated even in training mode. The vectors
        keep the codebook's precision when ``z`` has less (bfloat16 under autocast): quantised latents are codebook
        vectors.
        """
        quantizer = self.autoencoder.quantizer.quantizer
        _, _, indices = quantizer.quantize(z)
        codes = quantizer.embed(indices)
        return codes.to(torch.promote_types(z.dtype, codes.dtype))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantised embedding ``(B, embedding_dim, *latent_spatial)`` and a zero standard deviation."""
        e = self.nearest_codes(self.autoencoder.encode(images))
        return e, torch.zeros_like(e)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the nearest codes of the encoding."""
        return self.autoencoder.decode(self.posterior(images)[0])

    def decode(self, latents: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
        """``decode(nearest_codes(latents / scale_factor))``: re-quantise, then decode."""
        return self.autoencoder.decode(self.nearest_codes(latents / scale_factor))

    def downsample_factor(self) -> int:
        """The product of the encoder's downsampling strides (one strided convolution per level)."""
        factor = 1
        for params in self.autoencoder.encoder.downsample_parameters:
            factor *= int(params[0])
        return factor


def adapt(autoencoder: nn.Module) -> AutoencoderAdapter:
    """The adapter for a stage-1 network: :class:`VQAutoencoderAdapter` for a ``VQVAE``, else the KL one."""
    return VQAutoencoderAdapter(autoencoder) if is_vector_quantized(autoencoder) else KLAutoencoderAdapter(autoencoder)


def downsample_factor(autoencoder: nn.Module) -> int:
    """Spatial downsampling factor of a stage-1 network (possibly DDP-wrapped): see the adapters."""
    return adapt(autoencoder).downsample_factor()


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
