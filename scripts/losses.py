"""Stage-1 losses: reconstruction + KL or quantisation + adversarial (least squares) + optional perceptual and
spectral terms.

``AutoencoderLoss`` returns every term separately, so that the trainer can log each one and name the one that
went non-finite. Weights are constructor arguments, set in the config (never module globals).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from monai.losses import JukeboxLoss, PatchAdversarialLoss, SSIMLoss
from torch import nn

__all__ = ["AutoencoderLoss", "LocalPerceptualLoss", "kl_divergence"]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels and averaged over the batch.

    Args:
        z_mu: posterior mean, ``(B, latent_channels, *latent_spatial)``.
        z_sigma: posterior standard deviation, same shape.
    """
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1, dim=dims)
    return kl.mean()


class LocalPerceptualLoss(nn.Module):
    """Perceptual distance on the features of a pretrained network loaded from a local TorchScript file.

    Nothing is downloaded: export any feature extractor (e.g. a MedicalNet or RadImageNet backbone) with
    ``torch.jit.save(torch.jit.script(model), path)``; its ``forward`` must return a tensor or a list/tuple of
    feature maps. Features are unit-normalised along channels and their squared differences averaged, as in LPIPS
    without the learned linear layers.

    Args:
        weights_path: TorchScript file of the feature network.
        spatial_dims: 3 feeds volumes to a 3D network; with ``fake_3d=True`` a 2D network sees slices.
        fake_3d: compare 2D slices along the three axes (a "2.5D" loss) instead of whole volumes.
        fake_3d_ratio: fraction of slices sampled per axis when ``fake_3d``.
        in_channels: channels the network expects (the grey image is repeated to fill them).
    """

    def __init__(
        self,
        weights_path: str,
        spatial_dims: int = 3,
        fake_3d: bool = False,
        fake_3d_ratio: float = 0.25,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"perceptual network '{weights_path}' not found. Set perceptual_network_path to a local TorchScript "
                "file, or perceptual_weight to 0 to train without the perceptual loss."
            )
        self.network = torch.jit.load(weights_path, map_location="cpu").eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.spatial_dims = spatial_dims
        self.fake_3d = fake_3d
        self.fake_3d_ratio = fake_3d_ratio
        self.in_channels = in_channels

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.in_channels:
            x = x.mean(dim=1, keepdim=True).repeat(1, self.in_channels, *([1] * (x.ndim - 2)))
        out = self.network(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a.new_zeros(())
        for fa, fb in zip(self._features(a), self._features(b), strict=True):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (fa - fb).pow(2).sum(dim=1).mean()
        return total

    def _slices(self, x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
        # (B, C, X, Y, Z) -> (B * n, C, H, W) with the slicing axis folded into the batch
        x = x.index_select(axis, index).movedim(axis, 1)
        return x.reshape(-1, *x.shape[2:])

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.fake_3d:
            return self._distance(recon, target)
        total = recon.new_zeros(())
        for axis in range(2, recon.ndim):
            n = recon.shape[axis]
            count = max(1, int(n * self.fake_3d_ratio))
            index = torch.randperm(n, device=recon.device)[:count]
            total = total + self._distance(self._slices(recon, axis, index), self._slices(target, axis, index))
        return total / (recon.ndim - 2)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of a VAE-GAN (Rombach et al. 2022, sec. 3), KL-regularised or
    vector-quantised (van den Oord et al. 2017).

    Args:
        kl_weight: weight of the KL term (``AutoencoderKL``).
        adversarial_weight: weight of the generator's least-squares adversarial term.
        perceptual_weight: weight of the perceptual term; needs ``perceptual_network``.
        spectral_weight: weight of the spectral (Jukebox, FFT magnitude) term; 0 switches it off.
        ssim_weight: weight of the structural term ``1 - SSIM`` (MONAI ``SSIMLoss``, Gaussian window of
            ``ssim_win_size``, images in [0, 1]); 0 switches it off. SSIM penalises the lost contrast and structure of
            thin and small features (skull, lesions) that L1 averages away (Zhao et al. 2017).
        ssim_win_size: its window side in voxels (the validation SSIM's, 7).
        l2_weight: weight of a mean-squared term added to the reconstruction loss; 0 switches it off. With L1, whose
            optimum is the median, a thin structure disappears wherever the decoder is unsure of its edge; the squared
            term pulls those voxels towards the mean, so the structure is kept (at partial contrast).
        perceptual_network: a module ``(recon, target) -> scalar``, e.g. :class:`LocalPerceptualLoss`.
        spatial_dims: spatial dimensions of the images (for the spectral loss).
        reconstruction: ``"l1"`` or ``"l2"``.
        quantization_weight: weight of the VQ-VAE's quantisation (commitment) loss (``VQVAE``).
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        adversarial_weight: float = 0.01,
        perceptual_weight: float = 0.0,
        spectral_weight: float = 0.0,
        perceptual_network: nn.Module | None = None,
        spatial_dims: int = 3,
        reconstruction: str = "l1",
        quantization_weight: float = 1.0,
        ssim_weight: float = 0.0,
        ssim_win_size: int = 7,
        l2_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if perceptual_weight > 0 and perceptual_network is None:
            raise ValueError(
                "perceptual_weight > 0 needs a perceptual network: set perceptual_network_path to a local "
                "TorchScript feature extractor, or set perceptual_weight to 0."
            )
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got '{reconstruction}'.")
        self.kl_weight = kl_weight
        self.quantization_weight = quantization_weight
        self.adversarial_weight = adversarial_weight
        self.perceptual_weight = perceptual_weight
        self.spectral_weight = spectral_weight
        self.perceptual = perceptual_network if perceptual_weight > 0 else None
        self.spectral = JukeboxLoss(spatial_dims=spatial_dims) if spectral_weight > 0 else None
        self.ssim_weight = ssim_weight
        self.ssim = (SSIMLoss(spatial_dims=spatial_dims, data_range=1.0, win_size=ssim_win_size)
                     if ssim_weight > 0 else None)
        self.reconstruction = nn.L1Loss() if reconstruction == "l1" else nn.MSELoss()
        self.l2_weight = l2_weight
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def generator_terms(
        self,
        recon: torch.Tensor,
        target: torch.Tensor,
        regularisers: Mapping[str, torch.Tensor],
        fake_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted generator loss terms; their sum is the generator loss.

        Args:
            recon: reconstruction, image space ``(B, C, *spatial)``.
            target: input image, same shape.
            regularisers: unweighted latent regularisers by name, ``"kl"`` and/or ``"quantization"`` (scalars), as
                :mod:`scripts.autoencoders` adapters return them.
            fake_logits: discriminator logits of ``recon``; ``None`` during the adversarial warm-up.

        Raises:
            KeyError: a regulariser this loss has no weight for.
        """
        weights = {"kl": self.kl_weight, "quantization": self.quantization_weight}
        terms = {"recon": self.reconstruction(recon, target)}
        if self.l2_weight > 0:
            terms["l2"] = self.l2_weight * nn.functional.mse_loss(recon.float(), target.float())
        for name, value in regularisers.items():
            if name not in weights:
                raise KeyError(f"no weight for the latent regulariser '{name}'; known: {sorted(weights)}.")
            terms[name] = weights[name] * value
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual_weight * self.perceptual(recon, target)
        if self.spectral is not None:
            terms["spectral"] = self.spectral_weight * self.spectral(recon, target)
        if self.ssim is not None:
            terms["ssim"] = self.ssim_weight * self.ssim(recon.float(), target.float())
        if fake_logits is not None:
            terms["adv_g"] = self.adversarial_weight * self.adversarial(
                fake_logits, target_is_real=True, for_discriminator=False
            )
        return terms

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Least-squares discriminator loss, scaled by ``adversarial_weight`` as in MONAI's tutorials."""
        real = self.adversarial(real_logits, target_is_real=True, for_discriminator=True)
        fake = self.adversarial(fake_logits, target_is_real=False, for_discriminator=True)
        return self.adversarial_weight * 0.5 * (real + fake)
