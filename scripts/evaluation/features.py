"""Feature extractors for the distribution metrics (FID, MMD, precision/recall) of 3D volumes.

By default a randomly initialised 3D ResNet-10 with a fixed seed: nothing is downloaded, the features are the same on
every machine, and differences between sets of volumes still show (random convolutional features keep much of the
image statistics). Its numbers are reported as "FID (random features)" and are NOT comparable with published FIDs,
which use a pretrained network. A local TorchScript file of a pretrained medical network switches to it, applied
to whole volumes (``mode="3d"``) or to the slices of the three mid-planes' stacks (``mode="2.5d"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import Inferer
from monai.networks.nets import resnet10
from torch import nn

__all__ = ["FeatureExtractor", "RandomFeatures", "TorchScriptFeatures", "build_feature_extractor"]


class FeatureExtractor(nn.Module):
    """Maps volumes ``(B, 1, X, Y, Z)`` in [0, 1] (image space) to feature vectors ``(B, F)``; ``name`` labels the
    metrics computed on them. :meth:`extract` runs the network through ``inferer`` when one is set (e.g. an
    ``AutocastInferer`` for ``--amp true``)."""

    name: str = "features"
    inferer: Inferer | None = None

    @torch.no_grad()
    def extract(self, volumes: Sequence[torch.Tensor], batch_size: int = 4) -> torch.Tensor:
        """Features of each volume ``(1, X, Y, Z)``: a ``(N, F)`` float64 tensor on the CPU."""
        out = []
        device = next(self.parameters(), torch.zeros(())).device
        for i in range(0, len(volumes), batch_size):
            batch = torch.stack([v.float() for v in volumes[i:i + batch_size]]).to(device)
            feats = self(batch) if self.inferer is None else self.inferer(batch, self)
            out.append(feats.flatten(1).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


class RandomFeatures(FeatureExtractor):
    """Global-average-pooled features of a 3D ResNet-10 (half width, stride-2 stem) initialised with ``seed``
    (256 per volume).

    Args:
        seed: initialisation seed; the same seed gives the same network everywhere.
    """

    name = "random features"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = resnet10(spatial_dims=3, n_input_channels=1, conv1_t_size=3, conv1_t_stride=2, widen_factor=0.5,
                            feed_forward=False, shortcut_type="A").eval()
        torch.random.set_rng_state(state)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero-mean input so that the random filters respond to structure rather than to the mean intensity
        return self.net(x * 2.0 - 1.0)


class TorchScriptFeatures(FeatureExtractor):
    """A local TorchScript feature network (e.g. a pretrained medical encoder); nothing is downloaded.

    Args:
        path: the ``.pt``/``.ts`` file of ``torch.jit.save``.
        mode: ``"3d"`` feeds whole volumes ``(B, 1, X, Y, Z)``; ``"2.5d"`` feeds the 2D network every slice
            ``(S, 1, H, W)`` along each of the three axes (repeated to 3 channels when ``channels=3``) and averages
            the slice features per axis, concatenating the three axes.
        channels: input channels the network expects.
    """

    def __init__(self, path: str | Path, mode: str = "3d", channels: int = 1) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature_network_path: no file at '{path}'. Give a local TorchScript file, or "
                                    "null for the random-feature network (nothing is downloaded).")
        if mode not in ("3d", "2.5d"):
            raise ValueError(f"feature_network_mode must be '3d' or '2.5d', got '{mode}'.")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.mode = mode
        self.channels = int(channels)
        self.name = f"{path.stem} features, {mode}"

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels != x.shape[1]:
            x = x.repeat(1, self.channels, *([1] * (x.ndim - 2)))
        return self.net(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "3d":
            return self._net(x)
        per_axis = []
        for axis in (2, 3, 4):
            slices = x.movedim(axis, 1).flatten(0, 1).unsqueeze(1)  # (B * S, 1, H, W)
            feats = self._net(slices).view(x.shape[0], x.shape[axis], -1)
            per_axis.append(feats.mean(1))
        return torch.cat(per_axis, dim=1)


def build_feature_extractor(path: str | None = None, mode: str = "3d", channels: int = 1, seed: int = 0,
                            inferer: Inferer | None = None) -> FeatureExtractor:
    """:class:`TorchScriptFeatures` when ``path`` is given, else :class:`RandomFeatures` with ``seed``; its
    :meth:`~FeatureExtractor.extract` runs through ``inferer`` when given."""
    extractor = TorchScriptFeatures(path, mode, channels) if path else RandomFeatures(seed)
    extractor.inferer = inferer
    return extractor
